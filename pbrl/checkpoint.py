"""Hugging Face checkpoints: config.json + safetensors (one file, or shards listed in
model.safetensors.index.json).

Key convention: pbrl's parameter names are HF's without the leading `model.`; `lm_head.weight` has
no prefix in either. A bare backbone checkpoint (e.g. Qwen3-Embedding: `Qwen3Model`, no LM head) has
no `model.` prefix at all.

Training checkpoints are PyTorch DCP directories (each rank its shards); any of them becomes a HF
directory with

    python -m pbrl.checkpoint export RUN/checkpoints/step_N OUT [--model actor|critic] \
        [--dtype bfloat16]
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pbrl import distributed as dist
from pbrl.cli import run_main
from pbrl.files import read_json, resolve, weights_sha256, write_atomic
from pbrl.lora import merge
from pbrl.model import ModelArgs, Transformer, rope_inv_freq
from pbrl.tokenizer import Tokenizer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files that travel with the weights so that a saved policy is a complete, loadable HF model
# directory.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "chat_template.jinja")


def load_args(directory: Path) -> ModelArgs:
    config = directory / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{directory}: no config.json; expected a Hugging Face model "
                                f"directory")
    return ModelArgs.from_hf_config(read_json(config), where=str(config))


def weight_files(directory: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file that holds it."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index}: no 'weight_map'")
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{index} lists shard files that are missing: {missing}")
        return {name: directory / f for name, f in weight_map.items()}
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE}")
    return {name: single for name in _open(single).keys()}


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    # safetensors raises its own error types for truncated or corrupt headers
    except Exception as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


@torch.no_grad()
def load_model(path_or_id, dtype: torch.dtype | None = None, device=None, value_head: bool = False,
               shard=None) -> Transformer:
    """A Transformer from a HF checkpoint; dtype None keeps each tensor's stored dtype.

    shard: None loads the whole model into this process. Otherwise a function that shards a model
    (e.g. distributed.shard with its precision): the model is built on the meta device and sharded
    first, then each rank reads only its own rows of every tensor (FSDP2 splits dim 0 as torch.chunk
    does), so no rank ever holds the whole model, nor the whole of any tensor."""
    directory = resolve(path_or_id)
    args, files = load_args(directory), weight_files(directory)
    model, expected, fresh_head = matching_model(directory, args, files, value_head)
    if shard is not None:
        if dtype is not None:
            model.to(dtype)
        shard(model)
        model.to_empty(device=device if device is not None else "cpu")
    state = read_tensors(files, expected, dtype, device, model if shard is not None else None)
    if fresh_head:  # a fresh critic head outputs 0 at first, so early value targets are not noise
        for name, param in model.value_head.named_parameters(prefix="value_head"):
            if shard is not None:
                param.to_local().zero_()
            else:
                state[name] = torch.zeros(param.shape,
                                          dtype=dtype or state["embed_tokens.weight"].dtype,
                                          device=device)
    if shard is None:
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
    model.inv_freq = rope_inv_freq(args).to(device)  # buffers built on the meta device hold no data
    return model.eval()


def matching_model(directory: Path, args: ModelArgs, files: dict[str, Path], value_head: bool):
    """(a meta-device Transformer of the checkpoint's architecture, the tensors to read by pbrl
    name, whether the value head is fresh); a checkpoint whose tensors do not match config.json is
    refused."""
    bare = not any(name.startswith("model.") for name in files)
    has_lm_head = "lm_head.weight" in files or (args.tie_word_embeddings and not bare)
    if not bare and not has_lm_head:
        raise KeyError(f"{directory}: no lm_head.weight, and config.json has "
                       f"tie_word_embeddings=false, so the output layer is missing (a bare "
                       f"backbone has no 'model.' prefix)")
    with torch.device("meta"):
        model = Transformer(args, lm_head=has_lm_head, value_head=value_head)
    expected = dict(model.state_dict())
    if args.tie_word_embeddings and has_lm_head:
        expected.pop("lm_head.weight")
    fresh_head = value_head and "value_head.weight" not in files
    if fresh_head:
        expected = {k: v for k, v in expected.items() if not k.startswith("value_head.")}
    ours = {name.removeprefix("model.") for name in files}
    unexpected = sorted(n for n in files if n.removeprefix("model.") not in expected
                        and not (n == "lm_head.weight" and args.tie_word_embeddings))
    missing = sorted(set(expected) - ours)
    if missing or unexpected:
        raise KeyError(f"{directory}: checkpoint does not match the {args.model_type} architecture "
                       f"of config.json; missing tensors "
                       f"{missing[:10]}{' ...' if len(missing) > 10 else ''}, unexpected tensors "
                       f"{unexpected[:10]}")
    return model, expected, fresh_head


def read_tensors(files: dict[str, Path], expected: dict, dtype, device, sharded,
                  ours=lambda stored: stored.removeprefix("model.")) -> dict:
    """The expected tensors (by `ours`: a stored name -> the model's), each shape-, dtype- and
    finiteness-checked: whole into the returned dict, or (sharded: the model whose parameters are
    DTensors) each rank's own rows copied into its parameters."""
    # (a LoRA base's projections hold their weight as `base`: read under the plain name)
    params = {n.replace(".base.", "."): p for n, p in sharded.named_parameters()} \
        if sharded is not None else {}
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        if ours(name) in expected:
            by_file.setdefault(file, []).append(name)
    state = {}
    for file, names in by_file.items():
        with _open(file) as f:
            held = set(f.keys())
            for name in names:
                mine = ours(name)
                if name not in held:
                    raise ValueError(f"{file.parent / INDEX_FILE} maps tensor {name!r} to "
                                     f"{file.name}, which does not hold it: the shard map is "
                                     f"wrong")
                view = f.get_slice(name)  # reads only the header until indexed
                shape, stored = list(view.get_shape()), view.get_dtype()
                if shape != list(expected[mine].shape):
                    raise ValueError(f"{file}: tensor {name!r} has shape {shape}, config.json "
                                     f"implies {list(expected[mine].shape)}")
                if stored not in FLOAT_DTYPES:
                    raise ValueError(f"{file}: tensor {name!r} is stored as {stored}; model "
                                     f"weights are floating point ({', '.join(FLOAT_DTYPES)})")
                try:
                    if sharded is None:
                        tensor = f.get_tensor(name)
                        state[mine] = tensor.to(device=device, dtype=dtype or tensor.dtype)
                        rows = state[mine]
                    else:
                        start, stop = dist.shard_rows(shape[0], params[mine].device_mesh)
                        rows = params[mine].to_local()
                        rows.copy_(view[start:stop])
                except Exception as e:  # safetensors' own errors for truncated data
                    raise ValueError(f"{file}: cannot read tensor {name!r} ({e})") from None
                if not torch.isfinite(rows).all():  # (this rank's rows of it, when sharded)
                    raise ValueError(f"{file}: tensor {name!r} holds NaN or infinite values; the "
                                     f"checkpoint is damaged (or was saved from a diverged run)")
    return state


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors' names of what a weight may be stored as


def load_pretrained(path_or_id, dtype: torch.dtype | None = None, device=None,
                    value_head: bool = False) -> tuple[Transformer, Tokenizer]:
    """A model and its own tokenizer, checked to fit each other before any weight is read."""
    directory, tokenizer = check_pretrained(path_or_id)
    return load_model(directory, dtype=dtype, device=device, value_head=value_head), tokenizer


def check_pretrained(path_or_id, tokenizer: Tokenizer | None = None) -> tuple[Path, Tokenizer]:
    """What can be checked of a checkpoint without reading its weights: config.json, that the
    tokenizer fits it (the checkpoint's own, or the given one that will feed it), and that the
    weight files are there. Returns the local directory and the tokenizer."""
    directory = resolve(path_or_id)
    tokenizer = tokenizer or Tokenizer.from_pretrained(directory)
    tokenizer.check_fits(load_args(directory).vocab_size, str(directory))
    weight_files(directory)
    return directory, tokenizer


def hf_name(name: str, args: ModelArgs, backbone: bool = False) -> str | None:
    """pbrl name -> HF name; None for a tied LM head, which is not stored (HF convention;
    safetensors forbids aliases). A backbone (no LM head, e.g. an embedder) keeps bare names, as
    HF's `LlamaModel`/`Qwen3Model` do."""
    if name == "lm_head.weight" and args.tie_word_embeddings:
        return None
    return name if backbone or name.startswith(("lm_head.", "value_head.")) else f"model.{name}"


def hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs,
                  backbone: bool = False) -> dict[str, torch.Tensor]:
    """pbrl state dict -> the tensors a HF directory stores, under HF names, contiguous on the
    CPU."""
    return {hf_name(name, args, backbone): tensor.detach().contiguous().cpu()
            for name, tensor in state.items() if hf_name(name, args, backbone) is not None}


def save_model(model: Transformer, out_dir, source_dir=None, max_shard_bytes: int = 5 * 2**30,
               state: dict[str, torch.Tensor] | None = None,
               dtype: torch.dtype | None = None) -> Path:
    """Write model (and the tokenizer files of `source_dir`, if given) as a HF model directory, in
    `dtype` (None: as stored), in shards of at most max_shard_bytes. `state` overrides
    model.state_dict() (an FSDP model's gathered full state dict)."""
    state = model.state_dict() if state is None else state
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * (tensor.element_size() if dtype is None else dtype.itemsize)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return write_hf_model(out_dir, model.args, model.lm_head is None, shards,
                          lambda names: {n: state[n] for n in names}, dtype, source_dir)


def copy_side_files(source_dir, out: Path) -> None:
    """The tokenizer and generation files of a HF directory (SIDE_FILES that exist) into `out`."""
    if Path(source_dir).resolve() == Path(out).resolve():
        return
    for side in SIDE_FILES:
        if (Path(source_dir) / side).is_file():
            shutil.copyfile(Path(source_dir) / side, Path(out) / side)


def write_hf_model(out_dir, args: ModelArgs, backbone: bool, shards: list[list[str]],
                   load: Callable[[list[str]], dict[str, torch.Tensor]],
                   dtype: torch.dtype | None = None, source_dir=None) -> Path:
    """Write a HF model directory one shard at a time: `shards` lists the pbrl parameter names of
    each file, and `load(names)` returns their tensors only when that file is written, so host
    memory holds one shard (a streamed export). One file is model.safetensors; more get an index.
    Every file is written under a temporary name and renamed, config.json last: a crash never leaves
    a directory that looks complete."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / "config.json", out / SINGLE_FILE, out / INDEX_FILE, out / EXPORT_MARK,
                  *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    stored = [[n for n in names if hf_name(n, args, backbone) is not None] for names in shards]
    shards = [names for names in stored if names]
    files = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total, stored = {}, 0, dtype
    for file, names in zip(files, shards):
        tensors = hf_state_dict(load(names), args, backbone)
        if dtype is not None:
            tensors = {name: tensor.to(dtype) for name, tensor in tensors.items()}
        stored = stored or next(iter(tensors.values())).dtype
        with write_atomic(out / file) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with write_atomic(out / INDEX_FILE) as tmp:
            tmp.write_text(json.dumps(index, indent=2))
    if source_dir is not None:
        copy_side_files(source_dir, out)
    config = args.to_hf_config(stored, backbone)
    with write_atomic(out / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2))
    return out


EXPORT_MARK = "pbrl_export.json"  # what an export writes beside the weights: it made this directory


def check_export_target(out: Path, overwrite: bool) -> None:
    """An export writes into an empty or absent directory, or (overwrite) over an earlier export;
    never over files pbrl did not write (a source model's own directory, say)."""
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; the export writes a directory")
    if held and not (out / EXPORT_MARK).is_file():
        raise FileExistsError(f"{out} already holds files pbrl did not export "
                              f"({', '.join(held[:5])}); choose an empty or new directory "
                              f"(nothing was changed)")
    if held and not overwrite:
        raise FileExistsError(f"{out} holds an earlier export; --overwrite replaces it (nothing "
                              f"was changed)")


# --------------------------------------------------------------------------------------------------
# Training run directories
# --------------------------------------------------------------------------------------------------
LOCK_FILE = ".lock"


def claim_run_dir_on_rank0(out: Path, resume: bool, allowed: tuple[Path, ...] = ()):
    """claim_run_dir on rank 0 (which alone writes the directory); a refusal is raised on every
    rank. Returns the lock on rank 0, None elsewhere."""
    lock, refusal = None, None
    if dist.init()[0] == 0:
        try:
            lock = claim_run_dir(out, resume, allowed)
        except FileExistsError as e:
            refusal = str(e)
    refusal = dist.all_gather_objects(refusal)[0]
    if refusal:
        raise FileExistsError(refusal)
    return lock


def claim_run_dir(out: Path, resume: bool, allowed: tuple[Path, ...] = ()):
    """Make `out` this run's directory, before any model loads: a directory that holds anything
    (other than the `allowed` files, e.g. a pivot cache written there beforehand) belongs to an
    earlier run and is refused unless resuming; then an exclusive lock is held for as long as the
    returned file stays open (the process lives), so a second run on the same directory is refused
    instead of interleaving its metrics. Linux flock: released by the kernel when the process dies,
    so a crash leaves no stale lock."""
    import fcntl
    import socket
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"run.out_dir {out} is a file, not a directory")
    allowed_names = {LOCK_FILE} | {p.name for p in allowed
                                   if Path(p).parent.resolve() == out.resolve()}
    earlier = [] if not out.is_dir() else \
        sorted(p.name for p in out.iterdir() if p.name not in allowed_names)
    if earlier and not resume:
        raise FileExistsError(f"run.out_dir {out} already holds a run ({', '.join(earlier[:5])}); "
                              f"continue it with --run.resume true, or choose another run.out_dir "
                              f"(nothing was changed)")
    if earlier and not (out / LOCK_FILE).is_file():  # every run pbrl made holds its lock file
        raise FileExistsError(f"run.out_dir {out} holds files no pbrl run made ("
                              f"{', '.join(earlier[:5])}): --run.resume continues a pbrl run's "
                              f"directory only (nothing was changed)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / LOCK_FILE, "a+")
    except OSError as e:
        raise FileExistsError(f"run.out_dir {out} cannot be made this run's directory: "
                              f"{e.strerror or e}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "another process"
        lock.close()
        raise FileExistsError(f"run.out_dir {out} is in use by a live run ({owner}); wait for it "
                              f"to end or choose another run.out_dir") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


# --------------------------------------------------------------------------------------------------
# Training checkpoints: torch.distributed.checkpoint (DCP), each rank writing and reading its own
# shards
# --------------------------------------------------------------------------------------------------
TRAINER_FILE = "trainer.pt"
# DCP warns on every save or load outside a process group that it assumes one process: here that is
# the intent.
warnings.filterwarnings("ignore",
                        message="torch.distributed is disabled, unavailable or uninitialized")


def trained_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> set[str]:
    """The names of what `optimizer` trains of `model`: all of a full model (its tied LM head too),
    a LoRA actor's adapters, or a critic's adapters and value head on that same base (no
    optimizer: what requires a gradient)."""
    mine = {id(p) for p in model.parameters() if p.requires_grad} if optimizer is None else \
        {id(p) for group in optimizer.param_groups for p in group["params"]}
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in mine}


def trained_state(model: torch.nn.Module, state: dict, optimizer) -> dict:
    """A model's state without what `optimizer` does not train (a LoRA base, the other adapters)."""
    keep = trained_names(model, optimizer)
    return {k: v for k, v in state.items() if k in keep}


def _into_trained():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(strict=False)


# how a checkpoint's trained parameters are put back (the loader's check_same_model has checked
# that every one of them is there; the frozen ones are not stored)
INTO_TRAINED = _into_trained()


def sharded_state(models: dict[str, Transformer],
                  optimizers: dict[str, torch.optim.Optimizer]) -> dict:
    """{name: {"model": parameters, "optim": optimizer state}} as this rank holds them: DTensor
    shards of a sharded model, plain tensors otherwise; what trains only (a LoRA actor's frozen
    base is its models.policy, which the run reloads and identifies by hash). DCP saves and loads
    it in place; keys flatten to e.g. `actor.model.norm.weight`."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    state = {name: {"model": trained_state(model, get_model_state_dict(model),
                                           optimizers.get(name))}
             for name, model in models.items()}
    for name, optimizer in optimizers.items():
        state[name]["optim"] = get_optimizer_state_dict(models[name], optimizer)
    return state


def save_training_checkpoint(out: Path, step: int, models: dict[str, Transformer],
                             optimizers: dict[str, torch.optim.Optimizer], trainer_state: dict,
                             source_dir=None, keep: int | None = None,
                             rank_state: dict | None = None) -> Path:
    """{out}/checkpoints/step_N, a DCP checkpoint: every rank writes its own shards of the models
    and optimizer states (no rank gathers another's); rank 0 adds the DCP metadata, trainer.pt
    (`trainer_state`: tensors and plain containers) and, per model, a name/ directory with its
    config.json (and source_dir's tokenizer files for the actor) so that `export` can write it as a
    HF model. Written as step_N.tmp and renamed once complete, so a crash never leaves a directory
    that looks done; then all but the newest `keep` (None: all) are deleted. rank_state: this
    rank's own (tensors and plain containers; `load_rank_state` reads it back). A collective."""
    import torch.distributed.checkpoint as dcp
    rank = dist.init()[0]
    final = out / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    with disk_full_named(tmp):
        dcp.save(sharded_state(models, optimizers), checkpoint_id=tmp, process_group=dist.group())
        if rank_state is not None:
            torch.save(rank_state, rank_state_file(tmp))
        if rank == 0:
            torch.save({**trainer_state, "world_size": dist.group_size()}, tmp / TRAINER_FILE)
            for name, model in models.items():
                config = model.args.to_hf_config(next(model.parameters()).dtype,
                                                 model.lm_head is None)
                (tmp / name).mkdir()
                (tmp / name / "config.json").write_text(json.dumps(config, indent=2))
                if name == "actor" and source_dir is not None:
                    copy_side_files(source_dir, tmp / name)
    if rank_state is not None:
        dist.barrier()  # every rank's own file is in before the directory is renamed
    if rank == 0:
        os.replace(tmp, final)
        for old in finished_checkpoints(out)[:-keep] if keep else []:
            shutil.rmtree(old)
    dist.barrier()
    return final


@contextmanager
def disk_full_named(tmp: Path):
    """A write into `tmp` that fails for want of space is reported as that, and the partial `tmp`
    removed, whatever layer raised it (DCP gathers each rank's failure into a CheckpointException,
    a BaseException; torch.save says 'enforce fail at inline_container.cc'); earlier checkpoints
    stay as they were."""
    try:
        yield
    except BaseException as e:
        if not _no_space(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(tmp.parent).free if tmp.parent.is_dir() else 0
        raise OSError(errno.ENOSPC, f"no space left on the device holding {tmp.parent} while "
                                    f"writing {tmp} ({free / 2**20:.0f} MiB free); the earlier "
                                    f"checkpoints are kept") from None


def _no_space(error: BaseException) -> bool:
    """Whether an error, or any error it wraps, is a full disk."""
    todo, seen = [error], []
    while todo and len(seen) < 50:
        e = todo.pop()
        seen.append(e)
        # DCP's CheckpointException maps each failed rank to (exception, traceback)
        todo += [failure[0] for failure in getattr(e, "failures", {}).values()]
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
    return any(getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e)
               or "file write failed" in str(e) for e in seen)


def finished_checkpoints(out: Path) -> list[Path]:
    """{out}/checkpoints/step_N directories that were completed (not step_N.tmp), oldest first."""
    return sorted(p for p in (out / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))


def latest_checkpoint(out: Path) -> Path | None:
    done = finished_checkpoints(out)
    return done[-1] if done else None


def load_training_checkpoint(ckpt: Path, models: dict[str, Transformer],
                             optimizers: dict[str, torch.optim.Optimizer], max_step: int) -> dict:
    """Restore what save_training_checkpoint wrote into the (possibly sharded) models and
    optimizers, on any number of ranks: DCP reshards, and each rank reads only the stored chunks
    that overlap its own shards. Returns the trainer state. A checkpoint past max_step (run.steps)
    is an error before any weight is read. A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    trainer_state = load_state(ckpt / TRAINER_FILE)
    if trainer_state["step"] > max_step:
        raise ValueError(f"run.steps = {max_step} is below the step of the checkpoint to resume, "
                         f"{ckpt} (step {trainer_state['step']}); raise run.steps to continue the "
                         f"run")
    metadata = checkpoint_metadata(ckpt).state_dict_metadata
    stored = {key.split(".")[0] for key in metadata}
    if set(models) - stored:
        raise ValueError(f"{ckpt} holds {', '.join(sorted(stored))} but this run trains "
                         f"{', '.join(sorted(models))}: resume with the run's own ppo.advantage")
    for name, model in models.items():
        check_same_model(ckpt, name, model, metadata, optimizers.get(name))
    state = sharded_state(models, optimizers)
    try:
        dcp.load(state, checkpoint_id=ckpt, process_group=dist.group())
    except (Exception, dcp.api.CheckpointException) as e:
        # DCP gathers each rank's failure (a truncated shard, an unpickling error) into a
        # CheckpointException, a BaseException
        failures = isinstance(e, dcp.api.CheckpointException)
        cause = next(iter(e.failures.values()))[0] if failures else e
        detail = ": ".join([type(cause).__name__, *str(cause).splitlines()[:1]])[:300]
        raise ValueError(f"{ckpt}: the checkpoint cannot be read ({detail}); it is damaged: delete "
                         f"it to resume from the one before") from None
    for name, model in models.items():
        set_model_state_dict(model, state[name]["model"], options=INTO_TRAINED)
        if name in optimizers:
            set_optimizer_state_dict(model, optimizers[name], state[name]["optim"])
    return trainer_state


def check_same_model(ckpt: Path, name: str, model: Transformer, metadata: dict,
                     optimizer) -> None:
    """The checkpoint holds this model: every parameter it trains, in its shape. A checkpoint of
    other models is healthy, and an error that says so, not that it is damaged."""
    trains = trained_names(model, optimizer)
    for key, param in model.named_parameters():
        if key not in trains:  # a LoRA base, or the other adapters on it: not stored here
            continue
        stored = metadata.get(f"{name}.model.{key}")
        if stored is None or tuple(stored.size) != tuple(param.shape):
            found = "no such tensor" if stored is None else f"shape {list(stored.size)}"
            raise ValueError(f"{ckpt} holds another {name} than this run's: its {key} has {found}, "
                             f"this run's {list(param.shape)} (another models.policy or "
                             f"models.critic?); resume with the run's own models, or choose "
                             f"another run.out_dir")


class NotMetadata(pickle.UnpicklingError):
    pass


class MetadataUnpickler(pickle.Unpickler):
    """DCP writes .metadata with pickle, and torch reads it with a plain pickle.load, which calls
    whatever the file names. This one builds only what DCP's metadata holds: its record classes,
    torch's dtypes and Size, a layout by name and a path."""
    RECORDS = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    CALLABLES = {("torch.serialization", "_get_layout"), ("torch", "Size"),
                 ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.CALLABLES:
            return super().find_class(module, name)
        if module in self.RECORDS or module == "torch":
            found = super().find_class(module, name)
            if isinstance(found, type) and module in self.RECORDS or isinstance(found, torch.dtype):
                return found
        raise NotMetadata(f"it names {module}.{name}, which DCP metadata never holds")


def checkpoint_metadata(ckpt: Path):
    """The DCP metadata of a training checkpoint: every stored key with its full size and dtype.
    Read by MetadataUnpickler, so a crafted .metadata runs nothing; every load here reads it so
    before torch's own reader does."""
    path = Path(ckpt) / ".metadata"
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt}: no DCP .metadata; expected a training checkpoint "
                                f"(RUN/checkpoints/step_N), or the checkpoint is incomplete")
    try:
        with path.open("rb") as f:
            return MetadataUnpickler(f).load()
    except NotMetadata as e:
        raise ValueError(f"{path} is not DCP metadata: {e}; refused unread (a checkpoint must "
                         f"not run code)") from None
    except Exception as e:  # a truncated or corrupt file: pickle's or torch's own errors
        raise ValueError(f"{ckpt}/.metadata cannot be read ({type(e).__name__}); the checkpoint "
                         f"is damaged: delete it to resume from the one before") from None


def read_checkpoint_tensors(ckpt: Path, model: str,
                            names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Full tensors of one model of a training checkpoint (all of them, or `names`), read in this
    process alone (no collective): only these tensors' bytes are read and held."""
    import torch.distributed.checkpoint as dcp
    meta = checkpoint_metadata(ckpt).state_dict_metadata
    prefix = f"{model}.model."
    names = read_checkpoint_names(ckpt, model) if names is None else names
    state = {prefix + n: torch.empty(meta[prefix + n].size, dtype=meta[prefix + n].properties.dtype)
             for n in names}
    odd = [n for n, t in state.items() if not t.is_floating_point()]
    if odd:
        raise ValueError(f"{ckpt}: tensor {odd[0]!r} is stored as {state[odd[0]].dtype}; model "
                         f"weights are floating point: the checkpoint is damaged")
    dcp.load(state, checkpoint_id=ckpt, no_dist=True)
    bad = [n for n, t in state.items() if not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{ckpt}: tensor {bad[0]!r} holds NaN or infinite values; the checkpoint "
                         f"is damaged (or was saved from a diverged run)")
    return {n: state[prefix + n] for n in names}


def export(ckpt, out, model: str = "actor", dtype: torch.dtype | None = None,
           overwrite: bool = False, base=None) -> Path:
    """Write one model of a training checkpoint as a HF model directory in `dtype` (None: as
    stored), streamed: one file per transformer block (plus one for the embeddings and one for the
    rest), each read from the checkpoint only when it is written, so peak host memory is about one
    block (or the embedding matrix), not the model. `out` must be new or empty, or (overwrite) an
    earlier export. A LoRA run's actor: the adapters merged into the base (`base`, default where
    the run read it), and the adapters alone in PEFT's layout beside `out` (export_lora).
    """
    ckpt, out = Path(ckpt), Path(out)
    names = read_checkpoint_names(ckpt, model)
    if any(".lora_" in n for n in names):  # the adapters merged into their base's weights
        return export_lora(ckpt, out, base, dtype, overwrite)[0]
    if any(".critic_" in n for n in names):
        raise ValueError(f"{ckpt}'s {model} is adapters and a value head on the LoRA actor's "
                         f"base, not a model of its own: export the actor")
    check_export_target(out, overwrite)
    args = load_args(ckpt / model)
    blocks = [[n for n in names if n.startswith(f"layers.{i}.")]
              for i in range(args.num_hidden_layers)]
    first = [n for n in names if n.startswith("embed_tokens.")]
    rest = [n for n in names if n not in first and not n.startswith("layers.")]
    backbone = "lm_head.weight" not in names
    write_hf_model(out, args, backbone, [first, *blocks, rest],
                   lambda group: read_checkpoint_tensors(ckpt, model, group), dtype, ckpt / model)
    (out / EXPORT_MARK).write_text(json.dumps({"checkpoint": str(ckpt.resolve()), "model": model}))
    return out


def read_checkpoint_names(ckpt: Path, model: str) -> list[str]:
    """The parameter names of one model of a training checkpoint."""
    prefix = f"{model}.model."
    keys = checkpoint_metadata(ckpt).state_dict_metadata
    names = [key.removeprefix(prefix) for key in keys if key.startswith(prefix)]
    if not names:
        held = sorted({key.split(".")[0] for key in keys})
        raise KeyError(f"{ckpt} holds no model {model!r}; it holds {', '.join(held)}")
    return names


def rank_state_file(ckpt: Path, rank: int | None = None) -> Path:
    """Where a checkpoint keeps a rank's own state (default: this rank's, by its index among the
    ranks that checkpoint together)."""
    return ckpt / f"rank-{dist.group_rank() if rank is None else rank}.pt"


def load_rank_state(ckpt: Path) -> dict | None:
    """What save_training_checkpoint's rank_state saved for this rank (None: nothing)."""
    path = rank_state_file(ckpt)
    return load_state(path) if path.is_file() else None


def load_state(path: Path) -> dict:
    """trainer.pt: tensors and plain containers only (weights_only)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the checkpoint {path.parent} is incomplete: "
                                f"delete it to resume from the one before")
    try:
        return torch.load(path, weights_only=True)
    # torch raises RuntimeError, pickle or zip errors for a truncated or corrupt file
    except Exception as e:
        raise ValueError(f"{path}: cannot be read ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:200]}); the checkpoint "
                         f"{path.parent} is damaged: delete it to resume from the one before") \
            from None


# --------------------------------------------------------------------------------------------------
# LoRA checkpoints (pbrl/lora.py): the adapters, merged into their base or alone in PEFT's layout
# --------------------------------------------------------------------------------------------------
def lora_settings(rank: int, alpha: float, targets, base: Path) -> dict:
    """What a LoRA checkpoint records beside its adapters, to merge and export them later: the
    adapters' shape and scale, and the base they were trained on (where it was, and its hash)."""
    return {"rank": rank, "alpha": alpha, "targets": list(targets), "base": str(base),
            "base_sha256": weights_sha256(Path(base))}


def export_lora(ckpt: Path, out: Path, base=None, dtype: torch.dtype | None = None,
                      overwrite: bool = False) -> tuple[Path, Path]:
    """A LoRA checkpoint's actor as the merged model, a HF directory at `out` (W + (alpha / r) B A
    with W read from the base and cast to `dtype` first, as the run computed it; None: as the base
    stores it), streamed one block at a time from the base's files and the checkpoint's adapters;
    and the adapters alone in PEFT's layout beside it (adapter_dir), which
    `peft.PeftModel.from_pretrained(base, that directory)` loads. `base` (default: where the run
    read it) must hold the weights the adapters were trained on (by hash)."""
    ckpt, out = Path(ckpt), Path(out)
    lora = load_state(ckpt / TRAINER_FILE).get("lora")
    if lora is None:
        raise ValueError(f"{ckpt}: a LoRA checkpoint without its LoRA settings (written before "
                         f"pbrl recorded them); export it from the run that wrote it")
    base = Path(base or lora["base"])
    if not base.is_dir() or weights_sha256(base) != lora["base_sha256"]:
        found = "another model" if base.is_dir() else "missing"
        raise ValueError(f"{ckpt}'s adapters were trained on the base at {lora['base']} (weights "
                         f"hash {lora['base_sha256']}); {base} is {found}: pass the base it was "
                         f"trained on (--base)")
    for target in (out, adapter_dir(out)):
        check_export_target(target, overwrite)
    args, files = load_args(base), weight_files(base)
    _, expected, _ = matching_model(base, args, files, False)
    adapters = read_checkpoint_tensors(ckpt, "actor")  # rank r: about 2 r / hidden of the model
    scale = lora["alpha"] / lora["rank"]

    def merged(names):
        mine = {n: f for n, f in files.items() if n.removeprefix("model.") in names}
        state = read_tensors(mine, {n: expected[n] for n in names}, dtype, "cpu", None)
        for name, w in state.items():
            owner = name.removesuffix(".weight")
            if f"{owner}.lora_A" in adapters:
                state[name] = merge(w, adapters[f"{owner}.lora_A"], adapters[f"{owner}.lora_B"],
                                    scale)
        return state
    names = list(expected)
    blocks = [[n for n in names if n.startswith(f"layers.{i}.")]
              for i in range(args.num_hidden_layers)]
    rest = [n for n in names if not n.startswith("layers.")]
    write_hf_model(out, args, False, [*blocks, rest], merged, dtype, source_dir=base)
    (out / EXPORT_MARK).write_text(json.dumps({"checkpoint": str(ckpt.resolve()), "lora": lora}))
    return out, write_peft_adapters(adapter_dir(out), adapters, args, lora)


def write_peft_adapters(directory: Path, adapters: dict, args, lora: dict) -> Path:
    """The adapters in PEFT's layout: adapter_model.safetensors (fp32, PEFT's tensor names) and
    adapter_config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / EXPORT_MARK).write_text(json.dumps({"lora": lora}))
    tensors = {}
    for name, tensor in adapters.items():
        owner, which = name.rsplit(".", 1)  # which: lora_A or lora_B
        where = "base_model.model." + hf_name(f"{owner}.weight", args).removesuffix(".weight")
        tensors[f"{where}.{which}.weight"] = tensor.float().contiguous()
    from safetensors.torch import save_file
    with write_atomic(directory / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora["rank"],
              "lora_alpha": lora["alpha"], "target_modules": sorted(lora["targets"]),
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "use_rslora": False, "init_lora_weights": True,
              "modules_to_save": None, "base_model_name_or_path": lora["base"]}
    with write_atomic(directory / "adapter_config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2))
    return directory


def adapter_dir(out: Path) -> Path:
    """Where an export to `out` puts the adapters alone: OUT-adapter beside it (a run's final/:
    final-adapter/)."""
    return out.with_name(out.name + "-adapter")


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(
        description="Convert a training checkpoint (RUN/checkpoints/step_N) into a HF model "
                    "directory, one transformer block at a time.",
        usage="python -m pbrl.checkpoint export CHECKPOINT OUT [--model actor] [--dtype bfloat16] "
              "[--base DIR]")
    ap.add_argument("command", choices=["export"])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="actor",
                    help="which trained model: actor (the policy) or critic")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="the exported weights' dtype (default: as trained, fp32 masters)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an earlier export in OUT (never other files)")
    ap.add_argument("--base", type=Path,
                    help="a LoRA checkpoint: the base model its adapters were trained on (default: "
                         "where the run read it); the adapters alone also go to OUT-adapter/ "
                         "beside OUT, in PEFT's layout")
    args = ap.parse_args(argv)
    out = export(args.checkpoint, args.out, args.model,
                 getattr(torch, args.dtype) if args.dtype else None, args.overwrite, args.base)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_main(main)
