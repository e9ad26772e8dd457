"""Serving over ZeroMQ: server, clients, wire protocol, security, streaming."""
