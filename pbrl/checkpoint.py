"""Hugging Face checkpoints: config.json + safetensors (one file, or shards listed in model.safetensors.index.json).

Key convention: pbrl's parameter names are HF's without the leading `model.`; `lm_head.weight` has no prefix in
either. A bare backbone checkpoint (e.g. Qwen3-Embedding: `Qwen3Model`, no LM head) has no `model.` prefix at all.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pbrl import distributed as dist
from pbrl.files import read_json, resolve, write_atomic
from pbrl.model import ModelArgs, Transformer, rope_inv_freq
from pbrl.tokenizer import Tokenizer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files that travel with the weights so that a saved policy is a complete, loadable HF model directory.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja")


def load_args(directory: Path) -> ModelArgs:
    config = directory / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{directory}: no config.json; expected a Hugging Face model directory")
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
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


@torch.no_grad()
def load_model(path_or_id, dtype: torch.dtype | None = None, device=None, value_head: bool = False,
               shard=None) -> Transformer:
    """Build a Transformer from a HF checkpoint. dtype None keeps each tensor's stored dtype.

    shard: None loads the whole model into this process. Otherwise a function that shards a model (e.g.
    distributed.shard with its precision): the model is built on the meta device and sharded first, then each rank
    reads only its own rows of every tensor from the safetensors files (FSDP2 splits dim 0 as torch.chunk does), so
    no rank ever holds the whole model, nor the whole of any tensor."""
    directory = resolve(path_or_id)
    args = load_args(directory)
    files = weight_files(directory)
    bare = not any(name.startswith("model.") for name in files)
    has_lm_head = "lm_head.weight" in files or (args.tie_word_embeddings and not bare)
    if not bare and not has_lm_head:
        raise KeyError(f"{directory}: no lm_head.weight, and config.json has tie_word_embeddings=false, so the "
                       f"output layer is missing (a bare backbone has no 'model.' prefix on its tensors)")
    with torch.device("meta"):
        model = Transformer(args, lm_head=has_lm_head, value_head=value_head)
    expected = dict(model.state_dict())
    if args.tie_word_embeddings and has_lm_head:
        expected.pop("lm_head.weight")
    fresh_head = value_head and "value_head.weight" not in files
    if fresh_head:  # a fresh critic head: zero output at start, so early value targets are not noise
        for name in ("value_head.weight", "value_head.bias"):
            expected.pop(name)
    to_ours = {name: name.removeprefix("model.") for name in files}
    unexpected = [n for n, ours in to_ours.items()
                  if ours not in expected and not (ours == "lm_head.weight" and args.tie_word_embeddings)]
    missing = sorted(set(expected) - set(to_ours.values()))
    if missing or unexpected:
        raise KeyError(f"{directory}: checkpoint does not match the {args.model_type} architecture of config.json; "
                       f"missing tensors {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                       f"unexpected tensors {sorted(unexpected)[:10]}")
    if shard is not None:
        if dtype is not None:
            model.to(dtype)
        shard(model)
        model.to_empty(device=device if device is not None else "cpu")
        params = dict(model.named_parameters())
        if fresh_head:
            for name in ("value_head.weight", "value_head.bias"):
                params[name].to_local().zero_()
    state = {}
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        if to_ours[name] in expected:
            by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with _open(file) as f:
            for name in names:
                ours = to_ours[name]
                view = f.get_slice(name)  # reads only the header until indexed
                shape = list(view.get_shape())
                if shape != list(expected[ours].shape):
                    raise ValueError(f"{file}: tensor {name!r} has shape {shape}, config.json implies "
                                     f"{list(expected[ours].shape)}")
                try:
                    if shard is None:
                        tensor = f.get_tensor(name)
                        state[ours] = tensor.to(device=device, dtype=dtype or tensor.dtype)
                    else:
                        local = params[ours].to_local()
                        start, stop = shard_rows(shape[0], params[ours].device_mesh)
                        local.copy_(view[start:stop])
                except Exception as e:  # safetensors' own errors for truncated data
                    raise ValueError(f"{file}: cannot read tensor {name!r} ({e})") from None
    if shard is None:
        if fresh_head:
            ref = state["embed_tokens.weight"]
            state["value_head.weight"] = torch.zeros(1, args.hidden_size, dtype=ref.dtype, device=ref.device)
            state["value_head.bias"] = torch.zeros(1, dtype=ref.dtype, device=ref.device)
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
    model.inv_freq = rope_inv_freq(args).to(device)  # buffers built on the meta device hold no data
    return model.eval()


def shard_rows(rows: int, mesh=None, world: int = 1, rank: int = 0) -> tuple[int, int]:
    """The rows [start, stop) of dim 0 that a rank holds under FSDP2's Shard(0), which splits as torch.chunk:
    ceil(rows / world) rows per rank, the last ranks possibly fewer or none. `mesh` (a DeviceMesh) gives world and
    rank when set."""
    if mesh is not None:
        world, rank = mesh.size(), mesh.get_local_rank()
    per_rank = -(-rows // world)
    start = min(rank * per_rank, rows)
    return start, min(start + per_rank, rows)


def load_pretrained(path_or_id, dtype: torch.dtype | None = None, device=None,
                    value_head: bool = False) -> tuple[Transformer, Tokenizer]:
    """A model and its own tokenizer, checked to fit each other before any weight is read."""
    directory, tokenizer = check_pretrained(path_or_id)
    return load_model(directory, dtype=dtype, device=device, value_head=value_head), tokenizer


def check_pretrained(path_or_id, tokenizer: Tokenizer | None = None) -> tuple[Path, Tokenizer]:
    """What can be checked of a checkpoint without reading its weights: config.json, that the tokenizer fits it
    (the checkpoint's own, or the given one that will feed it), and that the weight files are there. Returns the
    local directory and the tokenizer."""
    directory = resolve(path_or_id)
    tokenizer = tokenizer or Tokenizer.from_pretrained(directory)
    tokenizer.check_fits(load_args(directory).vocab_size, str(directory))
    weight_files(directory)
    return directory, tokenizer


def hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs, backbone: bool = False) -> dict[str, torch.Tensor]:
    """pbrl names -> HF names; a tied LM head is not stored (HF convention; safetensors forbids aliases). A
    backbone (no LM head, e.g. an embedder) keeps bare names, as HF's `LlamaModel`/`Qwen3Model` do."""
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and args.tie_word_embeddings:
            continue
        hf = name if backbone or name.startswith(("lm_head.", "value_head.")) else f"model.{name}"
        out[hf] = tensor.detach().contiguous().cpu()
    return out


def save_model(model: Transformer, out_dir, source_dir=None, max_shard_bytes: int = 5 * 2**30,
               state: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write model (and the tokenizer files of `source_dir`, if given) as a HF model directory, in `dtype` (None:
    as stored). `state` overrides model.state_dict() (an FSDP model's gathered full state dict).

    Shards above max_shard_bytes, with an index. Files are written under a temporary name and renamed, so a
    crash never leaves a directory that looks complete."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = model.lm_head is None
    state = hf_state_dict(model.state_dict() if state is None else state, model.args, backbone)
    if dtype is not None:
        state = {name: tensor.to(dtype) for name, tensor in state.items()}
    dtype = next(iter(state.values())).dtype
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    for stale in [out / SINGLE_FILE, out / INDEX_FILE, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_atomic(out / name, lambda p, s=shard: save_file(s, str(p), metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {t: n for n, s in zip(names, shards) for t in s}}
        write_atomic(out / INDEX_FILE, lambda p: p.write_text(json.dumps(index, indent=2)))
    config = model.args.to_hf_config(dtype, backbone)
    write_atomic(out / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
    if source_dir is not None and Path(source_dir).resolve() != out.resolve():
        for side in SIDE_FILES:
            if (Path(source_dir) / side).is_file():
                shutil.copyfile(Path(source_dir) / side, out / side)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Training run directories
# ---------------------------------------------------------------------------------------------------------------
LOCK_FILE = ".lock"


def claim_run_dir_on_rank0(out: Path, resume: bool, allowed: tuple[Path, ...] = ()):
    """claim_run_dir on rank 0 (which alone writes the directory); a refusal is raised on every rank. Returns the
    lock on rank 0, None elsewhere."""
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
    """Make `out` this run's directory, before any model loads: a directory that holds anything (other than the
    `allowed` files, e.g. a pivot cache written there beforehand) belongs to an earlier run and is refused unless
    resuming; then an exclusive lock is held for as long as the returned file stays open (the process lives), so
    a second run on the same directory is refused instead of interleaving its metrics. Linux flock: released by
    the kernel when the process dies, so a crash leaves no stale lock."""
    import fcntl
    import socket
    out = Path(out)
    allowed_names = {LOCK_FILE} | {p.name for p in allowed if Path(p).parent.resolve() == out.resolve()}
    earlier = sorted(p.name for p in out.iterdir() if p.name not in allowed_names) if out.is_dir() else []
    if earlier and not resume:
        raise FileExistsError(f"run.out_dir {out} already holds a run ({', '.join(earlier[:5])}); continue it with "
                              f"--run.resume true, or choose another run.out_dir (nothing was changed)")
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / LOCK_FILE, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "another process"
        lock.close()
        raise FileExistsError(f"run.out_dir {out} is in use by a live run ({owner}); wait for it to end or choose "
                              f"another run.out_dir") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


def save_training_checkpoint(out: Path, step: int, models: dict[str, Transformer],
                             optimizers: dict[str, torch.optim.Optimizer], trainer_state: dict,
                             source_dir=None) -> Path:
    """{out}/checkpoints/step_N: each model as an HF directory (safetensors, with source_dir's tokenizer files),
    optimizer.pt with every optimizer's state and trainer.pt with `trainer_state`, through torch.save of tensors and
    plain containers (loaded with weights_only=True). The full states are gathered on rank 0, which writes them to
    step_N.tmp and renames it once complete: a crash never leaves a directory that looks done. A collective."""
    final = out / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    states = {name: dist.full_state_dict(model) for name, model in models.items()}
    optimizer_states = {name: dist.full_optimizer_state(models[name], opt) for name, opt in optimizers.items()}
    if dist.init()[0] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        for name, model in models.items():
            save_model(model, tmp / name, source_dir=source_dir, state=states[name])
        torch.save(optimizer_states, tmp / "optimizer.pt")
        torch.save(trainer_state, tmp / "trainer.pt")
        os.replace(tmp, final)
    dist.barrier()
    return final


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))
    return done[-1] if done else None


def load_training_checkpoint(ckpt: Path, models: dict[str, Transformer], optimizers: dict[str, torch.optim.Optimizer],
                             max_step: int) -> dict:
    """Restore what save_training_checkpoint wrote into the (possibly sharded) models and optimizers; returns the
    trainer state. A checkpoint past max_step (run.steps) is an error before any weight is read. A collective."""
    trainer_state = load_state(ckpt / "trainer.pt")
    if trainer_state["step"] > max_step:
        raise ValueError(f"run.steps = {max_step} is below the step of the checkpoint to resume, {ckpt} "
                         f"(step {trainer_state['step']}); raise run.steps to continue the run")
    optimizer_states = load_state(ckpt / "optimizer.pt")
    for name, model in models.items():
        saved = load_model(ckpt / name, dtype=next(model.parameters()).dtype, value_head=model.value_head is not None)
        dist.load_full_state(model, saved.state_dict(), optimizers.get(name), optimizer_states.get(name))
    return trainer_state


def load_state(path: Path) -> dict:
    """A training-state file (optimizer.pt, trainer.pt): tensors and plain containers only (weights_only)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the checkpoint {path.parent} is incomplete: delete it to resume "
                                f"from the one before")
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, pickle or zip errors for a truncated or corrupt file
        raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); the "
                         f"checkpoint {path.parent} is damaged: delete it to resume from the one before") from None
