"""FSDP2 sharding of a prepared L4Q model.

Dtype design (why the README's plain ``fully_shard`` recipe failed with "FSDP expects uniform
original parameter dtype"): FSDP2 requires one dtype across the *trainable* parameters of each
sharding group; frozen ones may differ (they are all-gathered as bytes).  So an ``L4QLinear``
keeps its frozen W0 (and bias) in the model's dtype, e.g. bf16 — the bulk of the memory, sharded
1/N per GPU like every other parameter — while its trainable A, B, step sizes and offsets are
float32 masters.  The default policy does not cast parameters (``param_dtype=None``): the
quantizer needs its step sizes in fp32 (a bf16 step size moves the grid by up to 0.4% and would
not match the converted integer model), and the layer's GEMMs with x run in x's dtype anyway.
Gradients are reduced in fp32.  Making W0 a buffer instead would leave every GPU holding the full
W0 (no saving on what dominates memory); casting everything to bf16 would round away the small
LSQ step-size updates.
"""
from __future__ import annotations

import torch
from torch import nn


def _fsdp():
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def default_mp_policy():
    """No parameter cast (fp32 trainable masters, model-dtype W0), gradient reduction in fp32."""
    _, MixedPrecisionPolicy = _fsdp()
    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)


def fsdp_units(model: nn.Module, layer_type: type, units: str = "block") -> list[list[nn.Module]]:
    """The modules of type ``layer_type`` in ``model`` grouped into FSDP2 units.

    ``units="block"``: one unit per decoder block, the layers whose qualified names share the prefix up to
    ``layers.N`` / ``h.N`` / ``blocks.N`` (a layer outside such a block is a unit of its own), so a step
    all-gathers once per block instead of once per linear; ``units="linear"``: one unit per layer.
    """
    if units not in ("block", "linear"):
        raise ValueError(f"units must be 'block' or 'linear', got {units!r}")
    groups: dict[str, list[nn.Module]] = {}
    for name, m in model.named_modules():
        if not isinstance(m, layer_type):
            continue
        key = name
        if units == "block":
            parts = name.split(".")
            for i in range(len(parts) - 1):
                if parts[i] in ("layers", "layer", "h", "blocks") and parts[i + 1].isdigit():
                    key = ".".join(parts[: i + 2])
                    break
        groups.setdefault(key, []).append(m)
    return list(groups.values())


def shard_l4q(qm: nn.Module, mesh=None, mp_policy=None, reshard_after_forward: bool = True,
              units: str = "block") -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to the ``L4QLinear`` layers of ``qm``, grouped by :func:`fsdp_units`
    (default: one unit per decoder block), and then to ``qm`` itself; returns ``qm``.

    Like ``fully_shard`` this converts ``qm``'s parameters to sharded DTensors in place (call it on the
    model ``prepare_l4q`` returned, which is already a copy of yours).  The graph calls each
    ``L4QLinear`` directly, so those are the units whose weights are gathered just in time.
    Needs an initialised process group with 2+ ranks (``torchrun --nproc-per-node N``), or a
    ``mesh``; gather the result with ``gather_l4q_state`` before ``convert_l4q``.
    """
    import torch.distributed as dist
    from .nn import L4QLinear

    fully_shard, _ = _fsdp()
    if mesh is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("shard_l4q: FSDP2 needs torch.distributed initialised with 2+ processes (launch with "
                             "`torchrun --nproc-per-node N` and call torch.distributed.init_process_group); "
                             "on one process train the prepared model as it is")
        if dist.get_world_size() < 2:
            raise ValueError("shard_l4q: FSDP2 asked for on one process (world size 1): sharding gains nothing; "
                             "train the prepared model unsharded, or launch 2+ processes with torchrun")
    layers = [m for m in qm.modules() if isinstance(m, L4QLinear)]
    if not layers:
        raise ValueError("shard_l4q: the model has no L4QLinear layer; run fxcompress.prepare_l4q first")
    for name, m in qm.named_modules():
        if isinstance(m, L4QLinear):
            dtypes = {p.dtype for p in m.parameters() if p.requires_grad}
            if len(dtypes) > 1:
                raise ValueError(f"shard_l4q: layer {name!r} has trainable parameters of several dtypes "
                                 f"{sorted(map(str, dtypes))}; FSDP2 needs one dtype per layer (keep A, B, scale "
                                 f"and offset float32, as prepare_l4q creates them)")
    policy = default_mp_policy() if mp_policy is None else mp_policy
    kw = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for group in fsdp_units(qm, L4QLinear, units):
        fully_shard(group if len(group) > 1 else group[0], **kw)
    fully_shard(qm, **kw)
    return qm


def gather_l4q_state(qm: nn.Module) -> dict:
    """The full (unsharded) state dict of an FSDP2-sharded model as plain CPU tensors on rank 0 (other ranks
    get an empty dict); call it on every rank (it all-gathers).

    Load it into an unsharded copy of the prepared model (``load_state_dict``) and call ``convert_l4q``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(qm, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                             broadcast_from_rank0=False))


def save_l4q_checkpoint(qm: nn.Module, optimizer, path) -> None:
    """Write the sharded model and optimizer state with ``torch.distributed.checkpoint`` (each rank writes
    its shards; call on every rank).  Resume with ``load_l4q_checkpoint`` on the same or another world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(qm, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def load_l4q_checkpoint(qm: nn.Module, optimizer, path) -> None:
    """Load a checkpoint written by ``save_l4q_checkpoint`` into a model sharded the same way (in place).

    A checkpoint of another configuration (other rank, bits, group size, layers) raises ValueError."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(qm, optimizer)
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    want = {f"model.{k}": tuple(v.shape) for k, v in model_sd.items()}
    have = {k: tuple(getattr(v, "size", ())) for k, v in meta.items() if k.startswith("model.")}
    missing = sorted(set(want) - set(have))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or wrong:
        detail = "; ".join([f"missing {k[6:]}" for k in missing[:5]] +
                           [f"{k[6:]}: checkpoint {have[k]} vs model {want[k]}" for k in wrong[:5]])
        raise ValueError(f"load_l4q_checkpoint: {path} was written for another model or L4QConfig ({detail}); "
                         f"prepare the model with the config the checkpoint was trained with")
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(qm, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
