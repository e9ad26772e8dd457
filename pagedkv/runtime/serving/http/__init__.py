"""The OpenAI-compatible HTTP gateway (`pagedkv api`): an ASGI app that talks to the engine over ZeroMQ."""
