"""kNN-LM baseline (Khandelwal et al. 2020) as the lm-eval model `knnlm`.

    memdec-eval --model knnlm \
        --model_args pretrained=BASE,datastore=DIR,k=1024,lmbda=0.25,temperature=1.0,backend=torch --tasks ...

At every position the base model's key (the input of its last block's MLP, `memdec.pipeline.keys`, the same
key the datastore holds) is searched in the datastore's index (`memdec.pipeline.search`); the k neighbours'
squared L2 distances d give p_knn = softmax(-d / temperature), scattered onto the neighbours' values
(next tokens), and mixed with the base model in log space (`memdec.inference.mixing`, via `MixtureLM`):
p = lmbda * p_knn + (1 - lmbda) * p_base. `recompute_dists=true` replaces the index's (approximate)
distances with exact ones from the stored keys. Padding positions are never searched.
"""

from __future__ import annotations

import math
import os

import torch
from lm_eval.api.registry import register_model

from memdec.eval.models import MixtureLM, _as_bool, _as_int
from memdec.inference.joint import check_temperature
from memdec.inference.knn import knn_distribution
from memdec.inference.mixing import mix_logprobs
from memdec.methods import Method, register_method
from memdec.pipeline.datastore import Datastore
from memdec.pipeline.keys import capture_keys, key_dim
from memdec.pipeline.search import BACKENDS, exact_distances, open_index


class KNNDistribution:
    """p_knn over a vocabulary from a datastore's index: `logprobs(keys) -> [n, vocab] log p_knn`."""

    def __init__(
        self,
        datastore: Datastore | str | os.PathLike,
        k: int = 1024,
        temperature: float = 1.0,
        backend: str = "torch",
        recompute_dists: bool = False,
        device: str | torch.device | None = None,
    ) -> None:
        self.datastore = datastore if isinstance(datastore, Datastore) else Datastore.open(datastore)
        self.k = int(k)
        self.temperature = check_temperature(temperature, "knnlm: temperature")
        self.recompute_dists = _as_bool(recompute_dists, "knnlm: recompute_dists")
        if not 1 <= self.k <= self.datastore.n:
            raise ValueError(f"knnlm: k = {self.k} must be between 1 and the size of datastore "
                             f"{self.datastore.path} ({self.datastore.n} entries)")
        if backend not in BACKENDS:
            raise ValueError(f"knnlm: backend {backend!r}: use one of {', '.join(BACKENDS)}")
        self.index = open_index(self.datastore, backend, device=device)
        self.values = torch.from_numpy(self.datastore.values.astype("int64"))

    def neighbours(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared L2 distances [n, k] float32, datastore rows [n, k]) of each key."""
        d, ids = self.index.search(keys.float(), self.k)
        if self.recompute_dists:
            d = exact_distances(keys.float(), ids.to(keys.device), self.datastore)
        return d.float().to(keys.device), ids.to(keys.device)

    def logprobs(self, keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """log p_knn [n, vocab_size] (float32) of each key [n, dim]; tokens no neighbour names get -inf."""
        d, ids = self.neighbours(keys)
        if self.values.device != ids.device:
            self.values = self.values.to(ids.device)
        p = knn_distribution(d, ids, self.values, self.temperature, vocab_size)
        return p.log()


@register_model("knnlm")
class KNNLM(MixtureLM):
    """Base HF causal LM interpolated with a kNN distribution over a memdec datastore."""

    def __init__(
        self,
        datastore: str | None = None,
        k: int = 1024,
        temperature: float = 1.0,
        backend: str = "torch",
        recompute_dists: bool | str = False,
        **kwargs,
    ) -> None:
        if not datastore:
            raise ValueError("knnlm: give datastore=DIR in --model_args (a folder written by `memdec datastore`)")
        k = _as_int(k, "knnlm: k")
        ds = Datastore.open(datastore)  # one-line FormatError for a missing / incomplete datastore
        if not 1 <= k <= ds.n:  # checked again by KNNDistribution; here before the base model loads
            raise ValueError(f"knnlm: k = {k} must be between 1 and the size of datastore {datastore} ({ds.n} entries)")
        super().__init__(**kwargs)
        ds.check_tokenizer(self.tokenizer)
        dim = key_dim(self.model)
        if dim != ds.dim:
            raise ValueError(f"knnlm: base model {self.pretrained_name} has keys of dim {dim}, datastore "
                             f"{datastore} holds keys of dim {ds.dim} (built with {ds.manifest.get('model')})")
        self.knn = KNNDistribution(ds, k, temperature, backend, recompute_dists, device=self.device)
        self._captured: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def pretrained_name(self) -> str:
        return str(getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__)

    # ---- keys: captured during the base model's own forward pass

    def base_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        with capture_keys(self.model) as capture:
            out = super().base_logprobs(input_ids, attention_mask)
        self._captured = (input_ids, capture.pop())
        return out

    def _keys(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        captured, self._captured = self._captured, None
        if captured is not None and captured[0] is input_ids:
            return captured[1]
        with torch.no_grad(), capture_keys(self.model) as capture:  # called without a base forward first
            self.model(input_ids=input_ids, attention_mask=attention_mask)
            return capture.pop()

    def other_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """log p_knn (B, T, V): the base key at each real position (`attention_mask` 1, every position without
        one) searched in the datastore; padding gets a uniform placeholder."""
        vocab = self.mix_vocab_size
        keys = self._keys(input_ids, attention_mask)
        real = (torch.ones(input_ids.shape, dtype=torch.bool) if attention_mask is None
                else attention_mask.bool()).to(keys.device)
        out = torch.full((*input_ids.shape, vocab), -math.log(vocab), dtype=torch.float32, device=keys.device)
        if real.any():
            out[real] = self.knn.logprobs(keys[real], vocab)
        return out

    def _generation_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state):
        """Mixed log-probs (B, V) of the next token; only the last (always real) position is searched."""
        base = self.base_logprobs(input_ids, attention_mask)[:, -1, :]
        keys = self._keys(input_ids, attention_mask)[:, -1, :]
        other = self.knn.logprobs(keys, self.mix_vocab_size).to(base.device)
        return mix_logprobs(base, other, self.lmbda), state

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info.update(knn_datastore=str(self.knn.datastore.path), knn_k=self.knn.k,
                    knn_temperature=self.knn.temperature, knn_backend=getattr(self.knn.index, "backend", None),
                    knn_recompute_dists=self.knn.recompute_dists)
        return info


register_method(Method(name="knnlm", label="+kNN-LM", model="knnlm", model_class="baselines.knnlm:KNNLM",
                       aliases=("knn-lm", "knn_lm", "+knn-lm"), variant_args=("lmbda", "datastore", "k", "temperature"),
                       bench="memdec.bench.methods:knnlm_specs"))
