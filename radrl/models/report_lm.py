"""The decoder LM of LM-RRG (BLIP-2's OPT in the real config; a tiny OPT over the report tokenizer here).

The visual extractor that feeds it (region blocks, VTrans) is built in the report-generation
task; its encoders are the CLIP of `radrl.models.clip`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, OPTConfig, OPTForCausalLM, PreTrainedTokenizerBase

from radrl.config import EMBEDDED, RANDOM, ReportGeneratorConfig
from radrl.models.tokenizer import BOS_ID, EOS_ID, PAD_ID
from radrl.models.weights import MissingWeightsError, embedded_path, looks_like_hub_id


@dataclass
class DecoderLM:
    """A causal LM and its tokenizer."""

    model: OPTForCausalLM
    tokenizer: PreTrainedTokenizerBase

    def save(self, folder: Path) -> None:
        """Write a transformers folder (model + tokenizer) that `build_decoder` reads back."""
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(str(folder))


def tiny_decoder_config(vocab_size: int) -> OPTConfig:
    """A two-layer OPT (~0.7M parameters besides embeddings) over the report tokenizer."""
    return OPTConfig(
        vocab_size=vocab_size, hidden_size=128, word_embed_proj_dim=128, ffn_dim=512, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256, dropout=0.0,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )


def opt27b_config() -> OPTConfig:
    """OPT-2.7B, the frozen decoder of BLIP-2 (OPT-2.7b variant)."""
    return OPTConfig(
        vocab_size=50272, hidden_size=2560, word_embed_proj_dim=2560, ffn_dim=10240, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=2048, pad_token_id=1, bos_token_id=2, eos_token_id=2,
    )


def build_decoder(cfg: ReportGeneratorConfig) -> DecoderLM:
    """Build the decoder LM the config names.

    A random OPT-2.7B is built on the meta device (shapes only): its 10 GB of fp32 weights
    are of no use untrained, and the real run loads them from a folder.
    """
    if cfg.decoder_weights == RANDOM:
        tokenizer = AutoTokenizer.from_pretrained(str(embedded_path("tokenizer")))
        if cfg.decoder_arch == "tiny":
            return DecoderLM(OPTForCausalLM(tiny_decoder_config(len(tokenizer))), tokenizer)
        with torch.device("meta"):
            return DecoderLM(OPTForCausalLM(opt27b_config()), tokenizer)
    source = str(embedded_path("decoder")) if cfg.decoder_weights == EMBEDDED else cfg.decoder_weights
    if not Path(source).expanduser().is_dir() and not looks_like_hub_id(source):
        raise MissingWeightsError(
            f"models.report_generator.decoder_weights: '{source}' does not exist. Give a transformers causal-LM folder "
            "(e.g. BLIP-2's OPT-2.7b language model saved with save_pretrained), or 'embedded' for the tiny one"
        )
    try:
        return DecoderLM(AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source))
    except OSError as error:
        raise MissingWeightsError(f"could not load the decoder LM '{source}': {error}") from error
