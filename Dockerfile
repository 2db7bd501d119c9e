# One image for the server and the agents (the agent only needs edgefleet[agent]).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY edgefleet edgefleet
COPY shared shared
COPY agent agent
COPY server server
ARG EXTRAS=server
# BROKER=1: Mosquitto too, for 'edgefleet broker' (the fleet broker of docker-compose.yml)
ARG BROKER=0
RUN if [ "$BROKER" = 1 ]; then apt-get update && apt-get install -y --no-install-recommends mosquitto \
    && rm -rf /var/lib/apt/lists/*; fi
RUN pip install --no-cache-dir ".[${EXTRAS}]"
ENTRYPOINT ["edgefleet"]
