"""meter: an observability and metering proxy for OpenAI-compatible LLM APIs."""

__version__ = "0.1.0"
