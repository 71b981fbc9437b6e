"""A learned per-token router between the base and the Memory Decoder (issue 17).

Instead of one fixed lmbda, a small network reads each position's final hidden states (the input of
each model's LM head, after the final norm) and four scalars (each distribution's largest
probability and entropy) and outputs log weights (log w_base, log w_mem) = log_softmax of 2 logits:

    log p = logaddexp(log w_base + log p_base, log w_mem + log p_mem)

With a threshold t, a token whose memory weight is <= t uses the base alone (weights exactly (1, 0)).
The network, its inputs and the threshold are the same function as lmdeploy's memdecode router
(`RouterNetwork` / `MemDecodeFusion._adaptive_fusion`: same module layout and state-dict keys, same
scalar order, same `<=` threshold), so `export_router` writes what lmdeploy loads.

A router folder holds `model.safetensors` and `router_config.json` (inputs, sizes, the tokenizer
fingerprint and the models it was trained with, training settings and final valid loss).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from memdec.core.errors import first_line
from memdec.core.formats import commit_partial, open_partial, read_json, write_json
from memdec.inference.fast import lm_logits_hidden
from memdec.inference.mixing import check_lmbda, mix_logprobs, tokenizer_fingerprint

ROUTER_CONFIG = "router_config.json"
ROUTER_WEIGHTS = "model.safetensors"
INPUTS = ("both", "base", "memory")
#: lmdeploy's input_mode for (inputs, scalars); base-only routers have no lmdeploy counterpart
LMDEPLOY_INPUT_MODE = {("both", True): "both", ("both", False): "both", ("memory", True): "mem_hidden_both_scalars",
                       ("memory", False): "memory_only"}


# ---- the network and the mixture ----


class RouterNetwork(nn.Module):
    """MLP over [hidden states, scalars] -> log weights (..., 2) for (base, memory).

    Module layout as lmdeploy's RouterNetwork: optional `scalar_projectors` (one Linear(1, d) + ReLU
    per scalar) and `mlp` (1 layer: Linear(in, 2); 2 layers: Linear(in, h), GELU, Dropout, Linear(h, 2)).
    While training, a fixed input standardisation (`set_normalization`) is applied first and later
    folded into the first layers (`fold_normalization`), so the saved network takes raw inputs.
    """

    def __init__(self, inputs: str, scalars: bool, base_hidden: int, memory_hidden: int, layers: int = 2,
                 hidden: int = 128, scalar_proj_dim: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        if inputs not in INPUTS:
            raise ValueError(f"router inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")
        if layers not in (1, 2):
            raise ValueError(f"router layers must be 1 or 2, got {layers}")
        if not inputs and not scalars:
            raise ValueError("router: needs hidden states or scalars as inputs")
        self.inputs, self.scalars, self.layers = inputs, bool(scalars), int(layers)
        self.hidden_dim = int(self.hidden_sizes(inputs, base_hidden, memory_hidden))
        self.num_scalars = 4 if scalars else 0
        self.scalar_proj_dim = int(scalar_proj_dim) if scalars else 0
        self.scalar_projectors = None
        if self.scalar_proj_dim > 0:
            self.scalar_projectors = nn.ModuleList(
                [nn.Sequential(nn.Linear(1, self.scalar_proj_dim), nn.ReLU()) for _ in range(self.num_scalars)])
        width = self.hidden_dim + (self.num_scalars * self.scalar_proj_dim if self.scalar_proj_dim else self.num_scalars)
        if layers == 1:
            self.mlp = nn.Sequential(nn.Linear(width, 2))
        else:
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 2))
        self._norm: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def hidden_sizes(inputs: str, base_hidden: int, memory_hidden: int) -> int:
        return {"both": base_hidden + memory_hidden, "base": base_hidden, "memory": memory_hidden}[inputs]

    def raw_input(self, base_hidden: torch.Tensor | None, memory_hidden: torch.Tensor | None,
                  scalars: torch.Tensor | None) -> torch.Tensor:
        """[selected hidden states, scalars] (..., hidden_dim + num_scalars), in the network's dtype."""
        parts = []
        if self.inputs in ("both", "base"):
            parts.append(base_hidden)
        if self.inputs in ("both", "memory"):
            parts.append(memory_hidden)
        if self.scalars:
            if scalars is None:
                raise ValueError("router: this router needs the four scalar features")
            parts.append(scalars)
        dtype = self.mlp[0].weight.dtype
        return torch.cat([p.to(dtype) for p in parts], dim=-1)

    def set_normalization(self, mean: torch.Tensor | None, std: torch.Tensor | None) -> None:
        self._norm = None if mean is None else (mean.float(), std.float())

    def forward_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Log weights (..., 2) from `raw_input`'s output."""
        if self._norm is not None:
            x = (x - self._norm[0]) / self._norm[1]
        if self.scalar_projectors is not None:
            h, s = x[..., : self.hidden_dim], x[..., self.hidden_dim :]
            x = torch.cat([h, *(p(s[..., i : i + 1]) for i, p in enumerate(self.scalar_projectors))], dim=-1)
        return torch.log_softmax(self.mlp(x), dim=-1)

    def forward(self, base_hidden: torch.Tensor | None, memory_hidden: torch.Tensor | None,
                scalars: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_raw(self.raw_input(base_hidden, memory_hidden, scalars))

    @torch.no_grad()
    def fold_normalization(self) -> None:
        """Merge the input standardisation into the first layers (same function, raw inputs)."""
        if self._norm is None:
            return
        mean, std = self._norm
        first = self.mlp[0]
        n_direct = self.hidden_dim if self.scalar_projectors is not None else self.hidden_dim + self.num_scalars
        w = first.weight[:, :n_direct]
        first.bias -= w @ (mean[:n_direct] / std[:n_direct])
        w /= std[:n_direct]
        if self.scalar_projectors is not None:
            for i, proj in enumerate(self.scalar_projectors):
                m, s = mean[self.hidden_dim + i], std[self.hidden_dim + i]
                lin = proj[0]
                lin.bias -= lin.weight[:, 0] * (m / s)
                lin.weight /= s
        self._norm = None


def init_weights_at(net: RouterNetwork, lmbda: float) -> None:
    """Start the router at the fixed mixture lmbda: last layer's weight 0, bias (log(1-lmbda), log(lmbda))."""
    lmbda = min(max(check_lmbda(lmbda, "lmbda-init"), 1e-3), 1 - 1e-3)
    last = net.mlp[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([math.log1p(-lmbda), math.log(lmbda)]))


def distribution_scalars(logp: torch.Tensor) -> torch.Tensor:
    """(largest probability, entropy) (..., 2) of next-token log-probs (..., V), in float32."""
    logp = logp.float()
    p = logp.exp()
    finite = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
    return torch.stack([p.max(dim=-1).values, -(p * finite).sum(dim=-1)], dim=-1)


def scalar_features(base_logp: torch.Tensor, memory_logp: torch.Tensor) -> torch.Tensor:
    """(base max prob, base entropy, memory max prob, memory entropy) (..., 4): lmdeploy's order."""
    return torch.cat([distribution_scalars(base_logp), distribution_scalars(memory_logp)], dim=-1)


def apply_threshold(log_weights: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Where the memory weight is <= `threshold`, weights exactly (1, 0): the base alone (None: no threshold)."""
    if threshold is None:
        return log_weights
    off = log_weights[..., 1].exp() <= threshold
    zero = torch.zeros((), dtype=log_weights.dtype, device=log_weights.device)
    return torch.stack([torch.where(off, zero, log_weights[..., 0]),
                        torch.where(off, zero - math.inf, log_weights[..., 1])], dim=-1)


def routed_logprobs(base_logp: torch.Tensor, memory_logp: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """logaddexp(log w_base + log p_base, log w_mem + log p_mem) of distributions (..., V); weights (..., 2)."""
    lw = log_weights.to(base_logp.dtype)
    return torch.logaddexp(base_logp + lw[..., 0:1], memory_logp + lw[..., 1:2])


def routed_target_logprobs(base_lp: torch.Tensor, memory_lp: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """The same mixture for per-token target log-probs (...,); weights (..., 2)."""
    lw = log_weights.to(base_lp.dtype)
    return torch.logaddexp(base_lp + lw[..., 0], memory_lp + lw[..., 1])


# ---- hidden states ----


def hidden_size(model) -> int:
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)


# ---- the router object ----


def check_threshold(value: Any) -> float | None:
    return None if value is None else check_lmbda(value, "router_threshold")


class Router:
    """A trained RouterNetwork, its config and the threshold it is used with."""

    def __init__(self, net: RouterNetwork, config: dict[str, Any], threshold: float | None = None,
                 path: str | None = None) -> None:
        self.net = net.eval()
        self.config = config
        self.threshold = check_threshold(threshold)
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike, threshold: float | None = None, base=None, memory=None,
             tokenizer=None) -> Router:
        """Load ROUTER/; with the models and tokenizer given, refuse a router trained for others (one line)."""
        from safetensors.torch import load_file

        threshold = check_threshold(threshold)
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"router {path}: no such folder")
        for name in (ROUTER_CONFIG, ROUTER_WEIGHTS):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"router {path}: {name} is missing (not a router folder)")
        try:
            config = read_json(folder / ROUTER_CONFIG)
            net = RouterNetwork(config["inputs"], config["scalars"], config["base_hidden_size"],
                                config["memory_hidden_size"], config["layers"], config["hidden"],
                                config.get("scalar_proj_dim", 0), config.get("dropout", 0.0))
            net.load_state_dict(load_file(str(folder / ROUTER_WEIGHTS), device="cpu"))
        except (KeyError, RuntimeError, OSError, json.JSONDecodeError) as e:
            raise ValueError(f"router {path}: unreadable ({first_line(e, typed=True)})") from None
        router = cls(net, config, threshold, str(path))
        router.check(base, memory, tokenizer)
        return router

    def check(self, base=None, memory=None, tokenizer=None) -> None:
        """One-line ValueError naming both sides if the models' hidden sizes or the tokenizer differ."""
        reads = {"both": ("base", "memory"), "base": ("base",), "memory": ("memory",)}[self.net.inputs]
        for what, model, key in (("base", base, "base_hidden_size"), ("memory", memory, "memory_hidden_size")):
            if model is not None and what in reads and hidden_size(model) != int(self.config[key]):
                raise ValueError(f"router {self.path}: trained for a {what} of hidden size {self.config[key]} "
                                 f"({self.config.get(what, '?')}), but {what} {getattr(model, 'name_or_path', '')} "
                                 f"has hidden size {hidden_size(model)}")
        if tokenizer is not None and self.config.get("tokenizer_fingerprint"):
            mine = tokenizer_fingerprint(tokenizer)
            if mine != self.config["tokenizer_fingerprint"]:
                raise ValueError(f"router {self.path}: trained with tokenizer {self.config['tokenizer_fingerprint']}, "
                                 f"but the models' tokenizer is {mine}")

    def to(self, device) -> Router:
        self.net.to(device)
        return self

    def summary(self) -> dict[str, Any]:
        """What a results JSON records about the router."""
        keys = ("inputs", "scalars", "layers", "hidden", "base", "memory", "final_valid_loss")
        return {"path": self.path, "threshold": self.threshold, **{k: self.config.get(k) for k in keys}}

    @torch.no_grad()
    def log_weights(self, base_hidden: torch.Tensor, memory_hidden: torch.Tensor, base_logp: torch.Tensor,
                    memory_logp: torch.Tensor) -> torch.Tensor:
        """Thresholded log weights (..., 2) from hidden states and full next-token log-probs (..., V)."""
        scalars = scalar_features(base_logp, memory_logp) if self.net.scalars else None
        dev = next(self.net.parameters()).device
        lw = self.net(base_hidden.to(dev), memory_hidden.to(dev), None if scalars is None else scalars.to(dev))
        return apply_threshold(lw, self.threshold).to(base_logp.device)

    @torch.no_grad()
    def feature_log_weights(self, base_feats: dict[str, np.ndarray], memory_feats: dict[str, np.ndarray]) -> torch.Tensor:
        """Thresholded log weights (n, 2) on CPU from two `model_features` results."""
        dev = next(self.net.parameters()).device
        scalars = torch.from_numpy(np.concatenate([base_feats["scalars"], memory_feats["scalars"]], axis=1))
        lw = self.net(torch.from_numpy(base_feats["hidden"]).to(dev), torch.from_numpy(memory_feats["hidden"]).to(dev),
                      scalars.to(dev))
        return apply_threshold(lw, self.threshold).cpu()

    def mix(self, base_logp: torch.Tensor, memory_logp: torch.Tensor, base_hidden: torch.Tensor,
            memory_hidden: torch.Tensor) -> torch.Tensor:
        """The routed mixture (..., V) of two models' next-token log-probs."""
        return routed_logprobs(base_logp, memory_logp, self.log_weights(base_hidden, memory_hidden, base_logp,
                                                                        memory_logp))

    def save(self, path: str | os.PathLike) -> Path:
        return save_router(self.net, self.config, path)


def save_router(net: RouterNetwork, config: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write model.safetensors + router_config.json into the folder `path` (created)."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    net.fold_normalization()
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(folder / ROUTER_WEIGHTS))
    write_json(folder / ROUTER_CONFIG, config)
    return folder


# ---- per-token features ----


@torch.no_grad()
def model_features(model, tokens: np.ndarray, window: int, stride: int | None = None, batch_size: int = 8,
                   vocab_size: int | None = None, temperature: float = 1.0, pad_id: int = 0,
                   progress: bool = False, what: str = "model") -> dict[str, np.ndarray]:
    """Per-token features under memdec.pipeline.data's sliding windows; entry i is the position predicting tokens[i+1].

    {"logp": float64 (n-1,) log p(target), "hidden": float32 (n-1, H) final hidden state,
    "scalars": float32 (n-1, 2) (largest probability, entropy)} (entries as memdec.inference.scoring.token_logprobs).
    """
    from tqdm.auto import tqdm

    from memdec.core.models import check_context
    from memdec.inference.mixing import log_softmax
    from memdec.pipeline.data import sliding_windows, window_batch

    tokens_t = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    n = int(tokens_t.numel())
    check_context(model, min(window, n), what)
    vocab_size = vocab_size or model.config.vocab_size
    device = next(model.parameters()).device
    out = {"logp": np.full(n - 1, np.nan), "hidden": np.zeros((n - 1, hidden_size(model)), np.float32),
           "scalars": np.zeros((n - 1, 2), np.float32)}
    windows = sliding_windows(n, window, stride)
    for i in tqdm(range(0, len(windows), batch_size), desc=f"features ({what})", disable=not progress):
        chunk = windows[i : i + batch_size]
        ids, attn, _ = window_batch(tokens_t, chunk, pad_id)
        logits, hid = lm_logits_hidden(model, ids.to(device), attn.to(device))  # the scoring paths' hidden state
        lp = log_softmax(logits[:, :-1], vocab_size, temperature)
        tgt = lp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).cpu().double()
        sc = distribution_scalars(lp).cpu()
        hid = hid[:, :-1].float().cpu()
        for b, w in enumerate(chunk):
            j0 = w.score_start - w.start
            sl, src = slice(w.score_start - 1, w.end - 1), slice(j0 - 1, w.end - w.start - 1)
            out["logp"][sl] = tgt[b, src].numpy()
            out["hidden"][sl] = hid[b, src].numpy()
            out["scalars"][sl] = sc[b, src].numpy()
    return out


def _save_features(path: Path, feats: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in feats.items()}, str(tmp))
    os.replace(tmp, path)


def _load_features(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(load_file(str(path)))


# ---- training ----


def _nll(net: RouterNetwork, x: torch.Tensor, blp: torch.Tensor, mlp: torch.Tensor,
         w: torch.Tensor | None = None) -> torch.Tensor:
    lp = routed_target_logprobs(blp, mlp, net.forward_raw(x).double())
    return -lp.mean() if w is None else -(w * lp).sum() / w.sum()


def _opt_save(opt: torch.optim.Optimizer, folder: Path) -> dict:
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.detach().reshape(v.shape).contiguous().cpu()
               for i, st in sd["state"].items() for k, v in st.items()}
    if tensors:
        save_file(tensors, str(folder / "optimizer.safetensors"))
    return {"param_groups": sd["param_groups"]}


def _opt_load(opt: torch.optim.Optimizer, folder: Path, meta: dict) -> None:
    from safetensors.torch import load_file

    state: dict[int, dict[str, torch.Tensor]] = {}
    if (folder / "optimizer.safetensors").exists():
        for key, v in load_file(str(folder / "optimizer.safetensors")).items():
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def train_router(
    base: str,
    memory: str,
    data: Sequence[str],
    out: str | os.PathLike,
    inputs: str = "both",
    scalars: bool = True,
    layers: int = 2,
    hidden: int = 128,
    scalar_proj_dim: int = 0,
    steps: int = 500,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    batch_tokens: int = 4096,
    window: int | None = None,
    stride: int | None = None,
    valid_fraction: float = 0.1,
    lmbda_init: float | None = None,
    balance: bool = True,
    save_every: int = 100,
    seed: int = 0,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "float32",
    cache_dir: str | os.PathLike | None = None,
    max_docs: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Train a router on held-out text (never a test split) and write it to `out` (via OUT.partial).

    Each `data` (a path or hf:NAME, memdec.pipeline.data's forms) is tokenized and scored once by each model
    (features cached in `cache_dir`, default OUT.partial/features); its last `valid_fraction` of tokens
    is the validation part; with `balance` each `data` weighs the same in the loss whatever its length. The router is trained with AdamW on minibatches of `batch_tokens` cached
    positions to minimise the routed mixture's NLL, starting from the fixed mixture `lmbda_init`
    (default the memory's memdec.json lmbda); the best valid checkpoint is kept. A killed run resumes
    from OUT.partial/checkpoint.
    """
    from tqdm.auto import tqdm

    from memdec.core.devices import parse_dtype
    from memdec.core.models import (
        context_length,
        load_causal_lm,
        load_tokenizer,
        read_memdec_json,
        resolve_model_path,
    )
    from memdec.eval.tune import _cache_path
    from memdec.inference.joint import default_lmbda
    from memdec.inference.mixing import check_same_tokenizer
    from memdec.pipeline.data import (
        CorpusSpec,
        check_min_tokens,
        default_stride,
        default_window,
        load_texts,
        tokenize,
    )

    # -- every input checked before long work --
    if inputs not in INPUTS:
        raise ValueError(f"--inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")
    if layers not in (1, 2):
        raise ValueError(f"--layers must be 1 or 2, got {layers}")
    for name, value in (("--steps", steps), ("--hidden", hidden), ("--batch-tokens", batch_tokens),
                        ("--save-every", save_every)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not lr > 0:
        raise ValueError(f"--lr must be > 0, got {lr}")
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"--valid-fraction must be in (0, 1), got {valid_fraction}")
    if not data:
        raise ValueError("give at least one --data (held-out text, never a test split)")
    torch_dtype = parse_dtype(dtype)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    base, memory = resolve_model_path(base, "base"), resolve_model_path(memory, "memory")
    tok = load_tokenizer(base, "base")
    check_same_tokenizer(tok, load_tokenizer(memory, "memory"), "base", "memory")
    lmbda0 = default_lmbda(read_memdec_json(memory)) if lmbda_init is None else check_lmbda(lmbda_init, "--lmbda-init")
    window = int(window or default_window(context_length(base, "base"), context_length(memory, "memory")))
    stride = int(stride or default_stride(window))
    specs = [CorpusSpec.from_arg(d, max_docs=max_docs) for d in data]
    streams = []
    for spec in specs:
        tokens = tokenize(load_texts(spec), tok, progress=False)
        check_min_tokens(len(tokens), window, f"data {spec.describe()}")
        streams.append(tokens)

    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    feat_dir = Path(cache_dir) if cache_dir else tmp / "features"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    kw = dict(window=window, stride=stride, batch_size=batch_size, vocab_size=len(tok), pad_id=pad, progress=progress)

    # -- features: one forward pass of each model over each text, cached (keyed like tune-lambda's cache) --
    feats: dict[str, list[dict[str, np.ndarray]]] = {"base": [], "memory": []}
    sizes: dict[str, int] = {}
    for name, what in ((base, "base"), (memory, "memory")):  # one model in memory at a time
        model = None
        for tokens in streams:
            path = _cache_path(feat_dir, f"router-{what}", name, tokens, window, stride, dtype).with_suffix(
                ".safetensors")
            if path.exists():
                feats[what].append(_load_features(path))
                sizes[what] = feats[what][-1]["hidden"].shape[1]
                continue
            if model is None:
                model = load_causal_lm(name, what, dtype=torch_dtype, device=device)
            f = model_features(model, tokens, what=what, **kw)
            _save_features(path, f)
            if cache_dir:  # tune-lambda's own cache of per-token log-probs gets them too
                from memdec.core.formats import save_npy

                lp_path = _cache_path(cache_dir, what, name, tokens, window, stride, dtype)
                if not lp_path.exists():
                    save_npy(lp_path, f["logp"])
            feats[what].append(f)
            sizes[what] = f["hidden"].shape[1]
        del model

    def stack(part: str) -> dict[str, torch.Tensor]:
        xs, bl, ml, ws = [], [], [], []
        for fb, fm in zip(feats["base"], feats["memory"], strict=True):
            n = len(fb["logp"])
            cut = int(round(n * (1 - valid_fraction)))
            sl = slice(0, cut) if part == "train" else slice(cut, n)
            cols = []
            if inputs in ("both", "base"):
                cols.append(fb["hidden"][sl])
            if inputs in ("both", "memory"):
                cols.append(fm["hidden"][sl])
            if scalars:
                cols += [fb["scalars"][sl], fm["scalars"][sl]]
            xs.append(np.concatenate(cols, axis=1))
            bl.append(fb["logp"][sl])
            ml.append(fm["logp"][sl])
            k = len(bl[-1])
            ws.append(np.full(k, 1.0 / (k * len(streams)) if balance else 1.0))
        w = np.concatenate(ws)
        return {"x": torch.from_numpy(np.concatenate(xs)).float(), "b": torch.from_numpy(np.concatenate(bl)),
                "m": torch.from_numpy(np.concatenate(ml)), "w": torch.from_numpy(w / w.sum())}

    tr, va = stack("train"), stack("valid")

    # -- the network, standardised inputs, AdamW; resumed from the checkpoint --
    torch.manual_seed(seed)
    net = RouterNetwork(inputs, scalars, sizes["base"], sizes["memory"], layers, hidden, scalar_proj_dim)
    init_weights_at(net, lmbda0)
    mean, std = tr["x"].mean(0), tr["x"].std(0).clamp_min(1e-4)
    net.set_normalization(mean, std)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    settings = {"inputs": inputs, "scalars": bool(scalars), "layers": layers, "hidden": hidden,
                "scalar_proj_dim": scalar_proj_dim, "steps": steps, "lr": lr, "weight_decay": weight_decay,
                "batch_tokens": batch_tokens, "window": window, "stride": stride, "valid_fraction": valid_fraction,
                "lmbda_init": lmbda0, "balance": bool(balance), "seed": seed, "data": [s.describe() for s in specs], "dtype": dtype}
    ckpt = tmp / "checkpoint"
    step, best, best_state, history = 0, math.inf, None, []
    if (ckpt / "state.json").exists():
        from safetensors.torch import load_file

        meta = read_json(ckpt / "state.json")
        if meta["settings"] != settings:
            raise ValueError(f"{tmp}: an unfinished run with other settings (pass --overwrite to start again)")
        net.load_state_dict(load_file(str(ckpt / "router.safetensors")))
        _opt_load(opt, ckpt, meta["optimizer"])
        step, best, history = meta["step"], meta["best_valid"], meta["history"]
        best_state = load_file(str(ckpt / "best.safetensors"))

    def valid_loss() -> float:
        net.eval()
        with torch.no_grad():
            return float(_nll(net, va["x"], va["b"], va["m"], va["w"]))

    def checkpoint() -> None:
        from safetensors.torch import save_file

        ckpt.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(ckpt / "router.safetensors"))
        save_file({k: v.contiguous() for k, v in best_state.items()}, str(ckpt / "best.safetensors"))
        write_json(ckpt / "state.json", {"step": step, "best_valid": best, "history": history, "settings": settings,
                                         "optimizer": _opt_save(opt, ckpt)})

    n = len(tr["b"])
    bar = tqdm(total=steps, initial=step, desc="train-router", disable=not progress)
    while step < steps:
        net.train()
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.multinomial(tr["w"], batch_tokens, replacement=True, generator=g)  # each --data weighted
        loss = _nll(net, tr["x"][idx], tr["b"][idx], tr["m"][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if step % save_every == 0 or step == steps:
            v = valid_loss()
            history.append({"step": step, "train_loss": loss.item(), "valid_loss": v})
            if v < best:
                best, best_state = v, {k: t.detach().clone() for k, t in net.state_dict().items()}
            bar.set_postfix(valid=f"{v:.4f}")
            checkpoint()
    bar.close()

    # -- reference losses on the valid part, the config, the rename --
    net.load_state_dict(best_state)
    with torch.no_grad():
        vb, vm, vw = va["b"], va["m"], va["w"]
        ref = {"base": float(-(vw * vb).sum()), "memory": float(-(vw * vm).sum())}
        grid = [i / 20 for i in range(21)]
        fixed = [float(-(vw * mix_logprobs(vb, vm, lm)).sum()) for lm in grid]
        ref["best_fixed_lmbda"] = grid[int(np.argmin(fixed))]
        ref["best_fixed"] = min(fixed)
        ref["lmbda_init"] = float(-(vw * mix_logprobs(vb, vm, lmbda0)).sum())
    config = {
        "format_version": 1, "kind": "memdec-router", **{k: settings[k] for k in ("inputs", "scalars", "layers",
                                                                                   "hidden", "scalar_proj_dim")},
        "dropout": 0.0, "base": str(base), "memory": str(memory), "base_hidden_size": sizes["base"],
        "memory_hidden_size": sizes["memory"], "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "vocab_size": len(tok), "hidden_state": "input of the LM head (after the final norm)",
        "training": {**settings, "train_tokens": int(n), "valid_tokens": int(len(vb)), "history": history},
        "final_valid_loss": best, "valid_reference_losses": ref,
    }
    save_router(net, config, tmp)
    shutil.rmtree(ckpt, ignore_errors=True)
    if not cache_dir:
        shutil.rmtree(tmp / "features", ignore_errors=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ---- export ----


def export_router(path: str | os.PathLike, out: str | os.PathLike, format: str = "lmdeploy",
                  threshold: float | None = None, overwrite: bool = False) -> Path:
    """Write ROUTER as lmdeploy's memdecode router folder: router_config.json (its keys) + router.safetensors.

    lmdeploy's loader (MemDecodeFusion) reads a folder's router_config.json and its newest .pt or
    .safetensors checkpoint; the safetensors state dict has its RouterNetwork's keys. A
    memory_fusion_config.json beside them is the memory_fusion/config.json to put in the memory's folder.
    """
    from safetensors.torch import save_file

    if format != "lmdeploy":
        raise ValueError(f"--format must be lmdeploy, got {format!r}")
    threshold = check_threshold(threshold)
    router = Router.load(path)
    cfg = router.config
    mode = LMDEPLOY_INPUT_MODE.get((cfg["inputs"], bool(cfg["scalars"])))
    if mode is None:
        raise ValueError(f"router {path}: inputs={cfg['inputs']} has no lmdeploy input_mode "
                         "(lmdeploy routers read both hidden states or the memory's)")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    tmp = open_partial(out, resume=False, replace_final=False)  # written in one go: nothing to resume
    write_json(tmp / "router_config.json", {
        "num_layers": int(cfg["layers"]), "input_mode": mode, "use_scalars": bool(cfg["scalars"]),
        "scalar_proj_dim": int(cfg.get("scalar_proj_dim", 0)), "hidden_dim": int(cfg["hidden"]),
        "dropout": 0.0})
    save_file({k: v.contiguous() for k, v in router.net.state_dict().items()}, str(tmp / "router.safetensors"))
    fusion = {"adaptive_router": True, "default_router": out.name, "routers": {out.name: {"path": out.name}},
              "lambda_base_only_threshold": -1.0 if threshold is None else threshold}
    write_json(tmp / "memory_fusion_config.json", fusion)
    if out.exists():
        shutil.rmtree(out)
    commit_partial(tmp, out)
    return out
