"""Fine-tuning data: the chat template, loaders, packing, the built-in instruction and safety sets.

chat.py       role markers as plain text, `encode_conversation` (ids + assistant-only loss mask),
              `render_prompt` / `encode_prompt` for generation
packing.py    `pack`: whole conversations into fixed windows with EOS separators and loss masks
formats.py    Alpaca / messages / preference loaders; malformed rows counted per reason in a LoadReport
builtin.py    an instruction set made from the standard library (the default corpus), no download
safety.py     the built-in safety set (harmful + look-alike benign prompts) and `refusal_detector`

Importing this package does not import torch (only `packing`'s tensor helpers do, when called).
"""

from lmloom.tune.builtin import Instruction, InstructionSet, build_instruction_set
from lmloom.tune.chat import (
    CHAT_TEMPLATE,
    END_MARKER,
    ROLE_MARKERS,
    ROLES,
    ChatFormatError,
    Message,
    encode_conversation,
    encode_prompt,
    escape_markers,
    render,
    render_prompt,
    reply_text,
    validate_messages,
)
from lmloom.tune.formats import (
    LoadReport,
    PreferenceExample,
    SFTExample,
    load_alpaca,
    load_messages,
    load_preferences,
    load_sft,
)
from lmloom.tune.packing import PackedWindow, PackStats, isolation_mask, pack, sft_batch, window_tensors
from lmloom.tune.safety import SafetyItem, load_safety_set, refusal_detector, safety_scores

__all__ = [
    "CHAT_TEMPLATE",
    "END_MARKER",
    "ROLES",
    "ROLE_MARKERS",
    "ChatFormatError",
    "Instruction",
    "InstructionSet",
    "LoadReport",
    "Message",
    "PackStats",
    "PackedWindow",
    "PreferenceExample",
    "SFTExample",
    "SafetyItem",
    "build_instruction_set",
    "encode_conversation",
    "encode_prompt",
    "escape_markers",
    "isolation_mask",
    "load_alpaca",
    "load_messages",
    "load_preferences",
    "load_safety_set",
    "load_sft",
    "pack",
    "refusal_detector",
    "render",
    "render_prompt",
    "reply_text",
    "safety_scores",
    "sft_batch",
    "validate_messages",
    "window_tensors",
]
