"""Speculative decoding: proposers guess the next tokens, the target model checks them all in one step."""

from services.llm.speculative.config import SpeculativeConfig, speculation_slots
from services.llm.speculative.proposer import Proposer, build_proposer

__all__ = ["Proposer", "SpeculativeConfig", "build_proposer", "speculation_slots"]
