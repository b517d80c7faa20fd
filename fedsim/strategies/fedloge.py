"""FedLoGe (Xiao et al., ICLR 2024): joint local and generic FL under long-tailed data.

Clients (`fedsim.clients.fedloge`) train a shared backbone against a frozen
sparse ETF classifier (SSE-C), an auxiliary global head `g_aux` and their own
local heads on detached features, and upload backbone + `g_aux`. The server
averages them as FedAvg does (weighted by sample counts). The generic model is
the backbone with `g_aux` realigned (GLA-FR): every class row of its weight
rescaled to one common norm, the bias kept, which removes the norm advantage
that frequent classes gain under a long tail. Training continues from the raw
`g_aux`; the realignment is applied to what the server evaluates and reports.

Beside that generic model the server also scores two other heads on the same
backbone (`evaluation_variants`): the raw `g_aux` (`server/raw-aux-*`), and SSE-C,
the frozen classifier the backbone trained against (`server/sse-c-*`), which is
what the reference's logs score.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg
from omegaconf import OmegaConf

from fedsim.errors import ConfigError, is_number, require
from fedsim.etf import sparse_etf
from fedsim.spec import RunSpec
from fedsim.state import Checkpointed


def classifier_key(arrays: ArrayRecord) -> str:
    """The classifier's weight: the last 2-D entry of the state.

    It is `fedsim.models.classifier_layer`'s weight (the model's last `nn.Linear`)
    when no matrix is registered after that layer; preflight checks the pair.
    """
    matrices = [key for key, array in arrays.items() if len(array.shape) == 2]
    if not matrices:
        raise ValueError("FedLoGe needs a model whose last layer is linear (no 2-D entry found)")
    return matrices[-1]


def check_classifier_is_last(spec: RunSpec) -> None:
    """Client and server must find the same head: the last linear layer's weight has to
    be the last matrix of the state (`classifier_key`)."""
    from fedsim.models import classifier_layer

    head = classifier_layer(spec.model)
    names = {module: name for name, module in spec.model.named_modules()}
    if classifier_key(ArrayRecord(spec.model.state_dict())) != f"{names[head]}.weight":
        raise ConfigError(
            f"model: FedLoGe needs the last linear layer's weight to be the last matrix of "
            f"the state (model {spec.cfg.model._target_} registers another one after it)"
        )


#: strategy.sse_c setting -> where the clients' value lives in the config.
SSE_C_SOURCES = {"seed": "seed", "sparsity": "client.etf_sparsity", "norm": "client.etf_norm",
                 "steps": "client.etf_steps", "lr": "client.etf_lr"}


def check_sse_c_matches_clients(cfg: Any) -> None:
    """Every `strategy.sse_c` setting equals the clients' (a lone override of one side
    would score backbone + SSE-C against another matrix than the one trained against)."""
    sse_c = cfg.strategy.get("sse_c")
    for name, value in (sse_c or {}).items():
        source = SSE_C_SOURCES.get(name)
        if source is None:
            raise ConfigError(f"strategy.sse_c.{name}: not an SSE-C setting (one of "
                              f"{sorted(SSE_C_SOURCES)})")
        clients = OmegaConf.select(cfg, source)
        if value is not None and clients is not None and value != clients:
            raise ConfigError(f"strategy.sse_c.{name} must equal {source} ({clients}), which "
                              f"the clients train with (got {value})")


def realign_rows(weight: np.ndarray, norm: float) -> np.ndarray:
    """Every row rescaled to L2 norm `norm` (an all-zero row stays zero)."""
    norms = np.linalg.norm(weight, axis=1, keepdims=True)
    scale = np.divide(norm, norms, out=np.zeros_like(norms), where=norms > 0)
    return weight * scale


class FedLoGe(Checkpointed, FedAvg):
    """FedAvg of backbone + g_aux; the server evaluates the GLA-FR realigned generic head.

    Parameters
    ----------
    generic_norm : float
        The common row norm of the generic head (reference: 1.7). Only the
        relative size of the rows and the kept bias matter for the prediction.
    sse_c : mapping or None
        The clients' SSE-C settings (`seed`, `sparsity`, `norm`, `steps`, `lr` of
        `fedsim.etf.sparse_etf`), to also score backbone + SSE-C; None, or any
        setting None (clients without SSE-C), leaves that score out.
    **kwargs
        Flower `FedAvg` arguments (fedsim fills in the cohort sizes).
    """

    def __init__(
        self, generic_norm: float = 1.7, sse_c: Mapping[str, Any] | None = None, **kwargs
    ) -> None:
        require(is_number(generic_norm) and generic_norm > 0, "strategy.generic_norm",
                "a number > 0", generic_norm)
        super().__init__(**kwargs)
        self.generic_norm = generic_norm
        usable = sse_c is not None and all(v is not None for v in sse_c.values())
        self.sse_c = dict(sse_c) if usable else None
        self._etf: dict[tuple[int, int], np.ndarray] = {}

    not_checkpointed = ("sse_c", "_etf")  # from the config; the ETF is rebuilt on demand

    @classmethod
    def check(cls, spec: RunSpec) -> None:
        """The generic head is found the way the clients find theirs, and the SSE-C the
        server scores is the one the clients train against."""
        check_classifier_is_last(spec)
        check_sse_c_matches_clients(spec.cfg)

    def evaluation_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        """The generic model: `arrays` with the classifier rows realigned to `generic_norm`."""
        weight_key = classifier_key(arrays)
        realigned = ArrayRecord({key: array for key, array in arrays.items()})
        weight = arrays[weight_key].numpy()
        realigned[weight_key] = Array(realign_rows(weight, self.generic_norm).astype(weight.dtype))
        return realigned

    @property
    def evaluation_variants(self) -> dict[str, Callable[[ArrayRecord], ArrayRecord]]:
        """The raw g_aux, and backbone + SSE-C when the clients' SSE-C is known."""
        variants = {"raw-aux": lambda arrays: arrays}
        if self.sse_c is not None:
            variants["sse-c"] = self.with_sse_c
        return variants

    def with_sse_c(self, arrays: ArrayRecord) -> ArrayRecord:
        """`arrays` with the classifier replaced by SSE-C (weight ETF^T, bias 0), the head
        the backbone trained against."""
        weight_key = classifier_key(arrays)
        weight = arrays[weight_key].numpy()
        shape = weight.shape  # (classes, features)
        if shape not in self._etf:
            etf = sparse_etf(shape[1], shape[0], **self.sse_c)
            self._etf[shape] = etf.T.numpy().astype(weight.dtype)
        swapped = ArrayRecord({key: array for key, array in arrays.items()})
        swapped[weight_key] = Array(self._etf[shape].copy())
        bias_key = weight_key.removesuffix("weight") + "bias"
        if bias_key in arrays:
            swapped[bias_key] = Array(np.zeros_like(arrays[bias_key].numpy()))
        return swapped

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg, plus the spread of g_aux's row norms (what GLA-FR evens out)."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and metrics is not None:
            norms = np.linalg.norm(arrays[classifier_key(arrays)].numpy(), axis=1)
            metrics = MetricRecord(dict(metrics))
            metrics["aux-norm-max"] = float(norms.max())
            metrics["aux-norm-min"] = float(norms.min())
        return arrays, metrics
