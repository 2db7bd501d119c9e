# One image for the server and the agents (the agent only needs edgefleet[agent]).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY edgefleet edgefleet
COPY shared shared
COPY agent agent
COPY server server
ARG EXTRAS=server
RUN pip install --no-cache-dir ".[${EXTRAS}]"
ENTRYPOINT ["edgefleet"]
