"""Stage-1 identity prompts (docs/method.md §3) as PEFT prompt tuning.

Every intra-camera identity has its own prompt ``"A photo of a X X X X person."`` whose ``X``
token embeddings are learnable. The vectors of all identities live in one PEFT
`PromptEmbedding` (``num_identities × num_prompt_tokens`` virtual tokens, configured by a
`PromptTuningConfig`) and are spliced into CLIP's token embeddings at the placeholder positions;
they are saved as a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) that
`peft.PeftConfig.from_pretrained` reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import PeftConfig, PromptEmbedding, PromptTuningConfig
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from .modeling_ccafl import CCAFLModel

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PROMPT_WEIGHTS_KEY = "prompt_embeddings"


def tokenize_prompt_template(
    tokenizer: PreTrainedTokenizerBase, prompt_text: str, placeholder: str, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Token ids ``[L]`` of the filled template, the placeholder positions ``[num_tokens]`` and the
    end-of-text position (CLIP pools there)."""
    placeholder_ids = tokenizer(placeholder, add_special_tokens=False)["input_ids"]
    if len(placeholder_ids) != 1:
        raise ValueError(
            f"prompt placeholder {placeholder!r} must be a single token of the tokenizer, got {len(placeholder_ids)}"
        )
    ids = torch.tensor(tokenizer(prompt_text)["input_ids"], dtype=torch.long)
    positions = (ids == placeholder_ids[0]).nonzero().flatten()
    if positions.numel() != num_tokens:
        raise ValueError(
            f"prompt {prompt_text!r} has {positions.numel()} placeholder tokens, expected num_prompt_tokens={num_tokens}"
        )
    eos = tokenizer.eos_token_id
    eot = (ids == eos).nonzero().flatten()
    if eot.numel() == 0:
        raise ValueError(f"the tokenizer adds no end-of-text token (id {eos}) to {prompt_text!r}")
    return ids, positions, int(eot[0])


class IdentityPromptLearner(nn.Module):
    """One learnable prompt per intra-camera identity, encoded by the CCAFL text path.

    Args:
        model: the `CCAFLModel` whose (frozen) text tower encodes the prompts. It is referenced,
            not registered as a submodule, so this module's state dict holds only the prompt vectors.
        tokenizer: the model's tokenizer (tokenises the template once).
        num_identities: number ``N`` of intra-camera identities.
        init_std: standard deviation of the N(0, std) initialisation (docs/method.md: 0.02).
    """

    def __init__(
        self,
        model: CCAFLModel,
        tokenizer: PreTrainedTokenizerBase,
        num_identities: int,
        init_std: float = 0.02,
    ):
        super().__init__()
        if num_identities < 1:
            raise ValueError(f"num_identities must be >= 1, got {num_identities}")
        config = model.config
        self.num_identities = int(num_identities)
        self.num_tokens = config.num_prompt_tokens
        ids, positions, eot = tokenize_prompt_template(
            tokenizer, config.prompt_text, config.prompt_placeholder, config.num_prompt_tokens
        )
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("placeholder_positions", positions, persistent=False)
        self.eot_position = eot
        self.peft_config = PromptTuningConfig(
            peft_type="PROMPT_TUNING",
            task_type=None,
            num_virtual_tokens=self.num_identities * self.num_tokens,
            token_dim=config.text_config.hidden_size,
            num_transformer_submodules=1,
            num_attention_heads=config.text_config.num_attention_heads,
            num_layers=config.text_config.num_hidden_layers,
            prompt_tuning_init="RANDOM",
            base_model_name_or_path=getattr(config, "_name_or_path", None) or None,
        )
        self.prompt_embedding = PromptEmbedding(self.peft_config, model.text_model.embeddings.token_embedding)
        nn.init.normal_(self.prompt_embedding.embedding.weight, mean=0.0, std=init_std)
        self._model = [model]  # a list hides the model from nn.Module registration

    @property
    def model(self) -> CCAFLModel:
        return self._model[0]

    @property
    def prompt_vectors(self) -> torch.Tensor:
        """Learnable vectors ``[N, num_tokens, text_hidden]``."""
        return self.prompt_embedding.embedding.weight.view(self.num_identities, self.num_tokens, -1)

    def prompt_embeddings(self, identity_ids: torch.Tensor) -> torch.Tensor:
        """Template token embeddings with the identities' vectors spliced in: ``[B, L, text_hidden]``."""
        token_embedding = self.model.text_model.embeddings.token_embedding
        base = token_embedding(self.token_ids).to(self.prompt_vectors.dtype)
        embeds = base.unsqueeze(0).expand(identity_ids.shape[0], -1, -1).clone()
        embeds[:, self.placeholder_positions] = self.prompt_vectors[identity_ids]
        return embeds

    def forward(self, identity_ids: torch.Tensor) -> torch.Tensor:
        """Projected text features ``[B, P]`` of the prompts of ``identity_ids [B]``."""
        if identity_ids.numel() and (identity_ids.min() < 0 or identity_ids.max() >= self.num_identities):
            raise ValueError(f"identity ids must lie in [0, {self.num_identities}), got {identity_ids.tolist()[:8]}...")
        embeds = self.prompt_embeddings(identity_ids)
        eot = torch.full((identity_ids.shape[0],), self.eot_position, device=embeds.device)
        return self.model.encode_prompt_embeddings(embeds, eot)

    @torch.no_grad()
    def all_text_features(self, batch_size: int = 256) -> torch.Tensor:
        """Text features ``[N, P]`` of every identity's prompt, computed in batches."""
        device = self.prompt_vectors.device
        chunks = [
            self(torch.arange(start, min(start + batch_size, self.num_identities), device=device)).float()
            for start in range(0, self.num_identities, batch_size)
        ]
        return torch.cat(chunks)

    # ---------------------------------------------------------------------------------- persistence
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the PEFT adapter: ``adapter_config.json`` + ``adapter_model.safetensors``."""
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.peft_config.save_pretrained(save_directory)
        metadata = {
            "format": "pt",
            "num_identities": str(self.num_identities),
            "num_prompt_tokens": str(self.num_tokens),
        }
        weights = self.prompt_embedding.embedding.weight.detach().float().contiguous().cpu()
        save_file({PROMPT_WEIGHTS_KEY: weights}, str(save_directory / ADAPTER_WEIGHTS_NAME), metadata=metadata)

    @classmethod
    def from_pretrained(
        cls, adapter_directory: str | os.PathLike, model: CCAFLModel, tokenizer: PreTrainedTokenizerBase
    ) -> IdentityPromptLearner:
        """Load prompts saved by `save_pretrained` onto ``model``."""
        adapter_directory = Path(adapter_directory)
        weights_file = adapter_directory / ADAPTER_WEIGHTS_NAME
        if not weights_file.is_file():
            raise FileNotFoundError(f"no prompt adapter weights at {weights_file}")
        peft_config = PeftConfig.from_pretrained(adapter_directory)
        num_tokens = model.config.num_prompt_tokens
        if peft_config.num_virtual_tokens % num_tokens:
            raise ValueError(
                f"{adapter_directory}: {peft_config.num_virtual_tokens} virtual tokens is not a multiple of the "
                f"model's num_prompt_tokens={num_tokens}"
            )
        learner = cls(model, tokenizer, peft_config.num_virtual_tokens // num_tokens)
        weights = load_file(str(weights_file))[PROMPT_WEIGHTS_KEY]
        learner.prompt_embedding.embedding.weight.data.copy_(weights)
        return learner.to(model.device)


def save_text_features(text_features: torch.Tensor, identity_camids: torch.Tensor, path: str | os.PathLike) -> None:
    """Save the per-identity text features ``[N, P]`` and their cameras ``[N]`` (safetensors)."""
    save_file(
        {"text_features": text_features.detach().float().cpu().contiguous(),
         "identity_camids": identity_camids.detach().long().cpu().contiguous()},
        str(path),
        metadata={"description": json.dumps("CCAFL stage-1 text feature of every intra-camera identity")},
    )


def load_text_features(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `save_text_features`: ``(text_features [N, P], identity_camids [N])``."""
    tensors = load_file(str(path))
    return tensors["text_features"], tensors["identity_camids"]


__all__ = ["IdentityPromptLearner", "load_text_features", "save_text_features", "tokenize_prompt_template"]
