"""``edgefleet simulate``: a fleet of simulated devices running the real agent against a real broker and server.

``fleet`` runs many ``AgentService``s on a few threads, ``network`` drives their
MQTT connections from one, ``runtime`` stands in for the interpreter, ``workers``
splits a fleet over processes, ``cli`` is the command.
"""
