"""`GatewayConfig`: everything the gateway enforces, loadable from YAML (`lmloom serve --config`).

host: 127.0.0.1
port: 8443
tls: {cert: /etc/lmloom/gw.crt, key: /etc/lmloom/gw.key}
limits: {rpm: 60, tpm: 20000}
validation: {max_tokens_cap: 1024, max_messages: 64}
injection: {action: flag, patterns: {my_rule: "(?i)open the pod bay doors"}}
filters: {blocked_categories: [weapons]}
log_prompts: false
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from lmloom.config import StrictConfig, format_validation_error
from lmloom.data.pii import ALL_TYPES, PiiType
from lmloom.errors import ConfigError


class TlsConfig(StrictConfig):
    cert: Path = Field(description="PEM certificate chain")
    key: Path = Field(description="PEM private key (keep it 0600)")


class LimitsConfig(StrictConfig):
    rpm: int = Field(60, ge=1, description="requests per minute for keys without their own limit")
    tpm: int = Field(100_000, ge=1, description="tokens per minute (prompt + max_tokens) likewise")
    settle_usage: bool = Field(
        True, description="after a response, refund unused tokens / charge the excess against the real usage"
    )
    bytes_per_token: float = Field(
        4.0, gt=0, description="prompt-token estimate when the upstream's tokenizer is unknown"
    )


class ValidationConfig(StrictConfig):
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_tokens_cap: int = Field(4096, ge=1, description="a larger max_tokens is refused (422)")
    default_max_tokens: int = Field(
        512, ge=1, description="set on requests without max_tokens, so the upstream is bounded too"
    )
    max_n: int = Field(4, ge=1)
    max_messages: int = Field(128, ge=1)
    max_message_chars: int = Field(32_000, ge=1)
    max_prompt_chars: int = Field(200_000, ge=1, description="all messages (or prompts) together")
    max_stop: int = Field(4, ge=0)
    extra_fields: list[str] = Field(
        default_factory=list, description="request fields beyond the OpenAI subset to pass through"
    )


class InjectionConfig(StrictConfig):
    enabled: bool = True
    action: Literal["block", "flag"] = Field("block", description="block: 403; flag: pass, audited")
    patterns: dict[str, str] = Field(
        default_factory=dict, description="extra name -> regex (searched, case-insensitive)"
    )
    disabled: list[str] = Field(default_factory=list, description="built-in pattern names switched off")
    decode_base64: bool = Field(True, description="also scan what base64 blobs in the prompt decode to")
    roles: list[str] = Field(
        default_factory=lambda: ["system", "developer", "user", "tool", "function"],
        description="message roles scanned (assistant turns are the model's own)",
    )


class FiltersConfig(StrictConfig):
    pii_types: list[PiiType] = Field(default_factory=lambda: list(ALL_TYPES))
    placeholders: dict[PiiType, str] = Field(default_factory=dict)
    keep_non_global_ips: bool = True
    keep_example_domains: bool = True
    holdback_chars: int = Field(
        160, ge=16, description="streaming: text held back so a secret split across chunks is caught whole"
    )
    max_holdback_chars: int = Field(
        8192, ge=256, description="streaming: an unbroken run longer than this is released (redacted)"
    )
    blocked_categories: list[str] = Field(
        default_factory=list, description="safety word-list categories that stop a response"
    )
    block_min_count: int = Field(1, ge=1)
    blocked_message: str = "[response withheld by the content filter]"


class GatewayConfig(StrictConfig):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    tls: TlsConfig | None = None
    allow_plaintext_remote: bool = Field(
        False, description="bind a non-loopback address without TLS (keys would cross the network in clear)"
    )
    upstream_api_key_env: str | None = Field(
        None, description="environment variable holding the key the gateway presents to the upstream"
    )
    upstream_timeout_s: float = Field(300.0, gt=0)
    max_response_bytes: int = Field(32_000_000, ge=1024)
    limits: LimitsConfig = LimitsConfig()
    validation: ValidationConfig = ValidationConfig()
    injection: InjectionConfig = InjectionConfig()
    filters: FiltersConfig = FiltersConfig()
    log_prompts: bool = Field(False, description="audit the (PII-redacted) prompt text, not only its sha256")
    audit_queue: int = Field(10_000, ge=1, description="pending audit entries before requests get 503")

    @model_validator(mode="after")
    def _transport(self) -> GatewayConfig:
        if self.tls is None and not self.allow_plaintext_remote and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is reachable from the network but no tls is configured: "
                "set tls.cert and tls.key (or allow_plaintext_remote: true behind a TLS proxy)"
            )
        return self


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_gateway_config(path: Path | None, **overrides: object) -> GatewayConfig:
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"gateway config {path}: cannot be read ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"gateway config {path}: not valid YAML") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"gateway config {path}: expected a mapping at the top")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        where = f"gateway config {path}: " if path else "gateway config: "
        lines = format_validation_error(exc, "", GatewayConfig).splitlines()
        raise ConfigError("\n".join(where + line.replace("Value error, ", "") for line in lines)) from None
