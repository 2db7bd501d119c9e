"""The ``edgefleet`` command: one entry point for the server, the agent and the operator CLI."""
