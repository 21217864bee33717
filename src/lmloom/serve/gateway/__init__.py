"""The security gateway in front of any OpenAI-compatible upstream: API keys, rate limits, input
validation, prompt-injection heuristics, output filtering, audit, metrics and TLS (see `app`)."""

from lmloom.serve.gateway.app import create_gateway
from lmloom.serve.gateway.config import GatewayConfig, load_gateway_config
from lmloom.serve.gateway.keys import ApiKeyStore

__all__ = ["ApiKeyStore", "GatewayConfig", "create_gateway", "load_gateway_config"]
