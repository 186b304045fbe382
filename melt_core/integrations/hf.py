"""melt's Ouro and MELT models as Hugging Face transformers models, without remote code.

``register()`` (run when this module is imported, which ``import melt_core`` arranges as soon as
transformers' auto classes are imported: ``autoregister``) makes ``AutoConfig`` / ``AutoModelForCausalLM``
load ``ouro`` and ``melt`` checkpoint directories into ``HFOuroForCausalLM`` / ``HFMeltForCausalLM``:
real ``PreTrainedModel`` + ``GenerationMixin`` classes whose ``model`` and ``lm_head`` submodules
ARE melt's (the same modules, so the checkpoint's tensor names load as they are, and ``dtype``,
``device_map`` and ``save_pretrained`` work as for any transformers model). The forward is melt's: ``generate()``
decodes through melt's inference engine (``inference.engine``, the one ``melt generate`` runs:
MELT's prefill chunked as it chunks it, left-padded batches exact, CUDA graphs on CUDA) and its
cache, wrapped in a transformers ``Cache`` (``LoopedCache``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..cache import KVCache
from ..errors import InvalidArgumentError
from ..inference.engine import Engine, EngineOptions
from ..models import OuroConfig, is_melt
from ..models.layers import RMSNorm
from ..models.registry import config_from_dict, model_class
from ..models.update_rules import KVGate

_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class _LoopedConfig(PretrainedConfig):
    """A config.json as transformers holds it; ``looped_config()`` is melt's typed view of it."""

    melt_architectures: ClassVar[tuple[str, ...]] = ()  # (transformers' configs are dataclasses)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        if config_dict.get("rope_scaling", 0) is None:  # Ouro writes null; transformers warns of the old name
            config_dict = {k: v for k, v in config_dict.items() if k != "rope_scaling"}
        return super().from_dict(config_dict, **kwargs)

    def looped_config(self) -> OuroConfig:
        raw = {k: v for k, v in self.to_dict().items() if k != "auto_map" or self.model_type == "ouro"}
        return config_from_dict(raw, source=f"{self.model_type} config")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["architectures"] = list(self.melt_architectures)  # melt's names, not the wrapper's
        if self.model_type == "melt":
            out.pop("auto_map", None)  # Ouro's remote code would build an Ouro model from a MELT dir
        return out


class OuroHFConfig(_LoopedConfig):
    model_type = "ouro"
    melt_architectures = ("OuroForCausalLM",)


class MeltHFConfig(_LoopedConfig):
    model_type = "melt"
    melt_architectures = ("MeltForCausalLM",)


class LoopedCache(Cache):
    """A transformers ``Cache`` over a melt ``KVCache`` (its layout: Ouro's slot per (loop, layer),
    MELT's one per layer shared by all loops) and the engine that runs it, grown by doubling as
    ``generate`` asks for more positions."""

    is_compileable = False

    def __init__(self, model: nn.Module, batch_size: int, loops: int | None) -> None:
        super().__init__(layers=[])
        self.model, self.batch_size_, self.loops = model, batch_size, loops
        self.engine = Engine(model, EngineOptions(loops=loops))
        self.kv: KVCache | None = None

    def reserve(self, num_tokens: int) -> KVCache:
        """The melt cache, with room for ``num_tokens`` more positions."""
        limit = self.model.config.max_position_embeddings
        needed = self.get_seq_length() + num_tokens
        if needed > limit:
            raise InvalidArgumentError(
                f"{needed} positions exceed the model's maximum {limit} (max_position_embeddings)"
            )
        if self.kv is None:
            self.kv = self.engine.new_cache(self.batch_size_, min(limit, max(needed, 256)))
        elif needed > self.kv.max_len:
            self.kv = self.kv.resized(min(limit, max(needed, 2 * self.kv.max_len)))
        return self.kv

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.kv is None else self.kv.length

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def reorder_cache(self, beam_idx: Tensor) -> None:
        raise InvalidArgumentError("melt's caches do not support beam search; use greedy decoding or sampling")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise InvalidArgumentError("melt's caches cannot drop batch rows; decode the batch to the end")

    def crop(self, max_length: int) -> None:
        raise InvalidArgumentError("melt's caches cannot be cropped (no assisted or speculative decoding)")


class _LoopedForCausalLM(PreTrainedModel, GenerationMixin):
    """A melt model (``self.looped``) whose ``model`` and ``lm_head`` modules are this model's own."""

    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _tied_weights_keys: ClassVar[list[str]] = []
    main_input_name = "input_ids"
    # ``gradient_checkpointing_enable()`` / ``activation_checkpointing_enable()`` (PEFT, TRL): Ouro
    # recomputes each (loop, layer) block; MELT each chunk of its chunk-wise forward (its blocks
    # carry the latent state from loop to loop, so a chunk is the smallest pure unit)
    supports_gradient_checkpointing = True

    def __init__(self, config: _LoopedConfig) -> None:
        super().__init__(config)
        self.gradient_checkpointing = False
        looped_config = config.looped_config()
        looped = model_class(looped_config)(looped_config)
        self.model, self.lm_head = looped.model, looped.lm_head
        object.__setattr__(self, "looped", looped)  # not a submodule: it shares model and lm_head
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the forward makes its own LoopedCache

    def _init_weights(self, module: nn.Module) -> None:
        """Weights a checkpoint does not hold (a fresh model): Ouro's initializer, gates at z0."""
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, KVGate):
            module.reset(self.looped.config.melt.z0)
        elif isinstance(module, nn.Linear):  # (a gate's own Linears are reset by the gate, applied after them)
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        labels: Tensor | None = None,
        logits_to_keep: int = 0,
        loops: int | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits of ``input_ids`` (B, S); ``attention_mask`` covers the whole sequence so far (as
        transformers passes it). With ``use_cache`` (``generate``) the tokens go through a
        ``LoopedCache``; without, the whole sequence is scored (MELT: chunk-wise, every row chunked
        from its first real token). ``loops``: the loop count (default: the model's)."""
        cache = cache if cache is not None else past_key_values
        use_cache = bool(use_cache if use_cache is not None else cache is not None)
        B, S = input_ids.shape
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        if not use_cache and self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            if is_melt(self.looped):
                hidden, taps = self.looped.forward_chunkwise(
                    input_ids, attention_mask, loops=loops, checkpoint_chunks=True
                )
            else:
                hidden, taps = self.looped.forward_hidden(
                    input_ids, attention_mask, loops=loops, checkpoint=self._gradient_checkpointing_func
                )
            logits = self.looped.head(hidden, taps, num_logits_to_keep=logits_to_keep).logits
        elif not use_cache:
            logits = self.looped(input_ids, attention_mask, loops=loops, num_logits_to_keep=logits_to_keep).logits
        else:
            if not isinstance(cache, LoopedCache):
                if cache is not None and cache.get_seq_length() > 0:
                    raise InvalidArgumentError("a melt model decodes through its own cache, not a transformers one")
                cache = LoopedCache(self.looped, B, loops)
            new_mask = None if attention_mask is None else attention_mask[:, -S:]
            if new_mask is not None and not bool(new_mask[:, -1].all()):
                raise InvalidArgumentError(
                    "a batch to generate from must be left-padded: load the tokenizer with padding_side='left'"
                )
            kv = cache.reserve(S)
            if kv.length and S == 1:  # a decode step
                logits = cache.engine.step(kv, input_ids)[:, None]
            elif logits_to_keep == 1:  # generate()'s prefill: the last position's logits
                logits = cache.engine.prefill(kv, input_ids, new_mask)[:, None]
            else:
                logits = cache.engine.prefill(kv, input_ids, new_mask, all_positions=True)[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].float()
            loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})


class HFOuroForCausalLM(_LoopedForCausalLM):
    config_class = OuroHFConfig


class HFMeltForCausalLM(_LoopedForCausalLM):
    config_class = MeltHFConfig


_REGISTERED = False


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know ``ouro`` and ``melt`` (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    for config_cls, model_cls in ((OuroHFConfig, HFOuroForCausalLM), (MeltHFConfig, HFMeltForCausalLM)):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    _REGISTERED = True


register()  # melt_core.integrations.autoregister imports this module to register melt's models

__all__ = ["HFMeltForCausalLM", "HFOuroForCausalLM", "LoopedCache", "MeltHFConfig", "OuroHFConfig", "register"]
