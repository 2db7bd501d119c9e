"""The edgefleet agent: runs on each device, installs signed models, reports.

Needs only ``edgefleet[agent]`` (paho-mqtt, cryptography, numpy, a TFLite
interpreter). Never imports tensorflow, sqlalchemy or ``server``.
"""
