"""The edgefleet server: registry, compression, artifact store, rollouts, ingest."""
