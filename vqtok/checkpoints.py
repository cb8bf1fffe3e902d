"""A training state as safetensors and JSON, no pickle: what a checkpoint of `vqtok.runs` holds, and reading it back.

A checkpoint folder (OUT/checkpoints/step-000500/) holds:
    state.json, state.safetensors   the state the processes share, written by the main process: each object the
                                    run tracks (`Run.track`: the model, unwrapped; the optimizer; ...), by name,
                                    as its state_dict, the tensors in the .safetensors file and everything else
                                    (an optimizer's param_groups, a scaler's scale) in the JSON, which also
                                    records the format, the step and how many processes wrote the checkpoint
    rng-0.json, rng-0.safetensors   process 0's random states: Python's and NumPy's as numbers, torch's (the
                                    CPU's, and each GPU's) as uint8 tensors; a pair per process
    _COMPLETE                       in a store only: written last, once every process has uploaded its files

Why not accelerate's `save_state` / `load_state` (and `register_for_checkpointing`), which accelerate's own
examples use: a run folder in a shared bucket is a trust boundary, and resuming from it must not run code that
whoever can write there planted. accelerate pickles everything but the model: optimizer.bin, scheduler.bin,
random_states_N.pkl, and custom_checkpoint_N.pkl for registered objects, which `load_state` unpickles with
weights_only=False; and it passes over a random_states file it cannot load without a word. Here nothing is
unpickled: safetensors files hold only tensors, JSON files only plain values, and reading refuses a folder that
holds any file vqtok does not write, or a checkpoint in accelerate's format (which earlier vqtok wrote).

A state_dict becomes JSON with its tensors replaced by references into the .safetensors file (`flatten`), and
back (`unflatten`). JSON has objects with string keys and arrays only, so what it lacks is tagged: a tensor is
{"__tensor__": NAME}, a tuple {"__tuple__": [...]}, a dict with other keys (an optimizer's state, keyed by
parameter index) {"__dict__": [[KEY, VALUE], ...]}.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqtok.errors import VQTokError

FORMAT, VERSION = "vqtok-checkpoint", 1
STATE = "state"  # state.json and state.safetensors
COMPLETE_NAME = "_COMPLETE"  # in a store: written last into a checkpoint whose every file is uploaded
RANDOM_STATE = re.compile(r"^rng-(\d+)\.(json|safetensors)$")
# What accelerate's save_state wrote into vqtok's checkpoints before this format: any of them without a
# state.json is a checkpoint of earlier vqtok.
ACCELERATE_NAMES = re.compile(
    r"^(model(_\d+)?\.safetensors|pytorch_model.*\.bin|(optimizer|scheduler|sampler)(_\d+)?\.bin|scaler\.pt"
    r"|random_states_\d+\.pkl|custom_checkpoint_\d+\.pkl)$"
)
TENSOR, TUPLE, DICT = "__tensor__", "__tuple__", "__dict__"
TAGS = (TENSOR, TUPLE, DICT)


class CheckpointError(VQTokError):
    """A checkpoint cannot be resumed from: files vqtok does not write, another format, a state that does not fit
    the run."""


def flatten(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """A nested state (dicts, lists, tuples, numbers, strings, None, tensors) -> (a JSON-able skeleton, the
    tensors it names). Each tensor is named by where it sits ("optimizer/state/0/exp_avg"), and copied to the
    CPU: safetensors refuses tensors that share memory, and the live ones go on training."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, path: str) -> Any:
        def child(key) -> str:
            return f"{path}/{key}" if path else str(key)

        if isinstance(value, torch.Tensor):
            if path in tensors:  # keys such as "a/b" beside "a" -> "b" would give two tensors one name
                raise ValueError(f"two tensors of the state would both be named {path!r}")
            tensors[path] = value.detach().to("cpu", copy=True).contiguous()
            return {TENSOR: path}
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if isinstance(value, list):
            return [encode(v, child(i)) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {TUPLE: [encode(v, child(i)) for i, v in enumerate(value)]}
        if isinstance(value, dict):
            plain = all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in TAGS)
            if plain:
                return {k: encode(v, child(k)) for k, v in value.items()}
            if not all(isinstance(k, str | int) and not isinstance(k, bool) for k in value):
                raise TypeError(f"{path}: a checkpoint holds dicts keyed by strings or integers only")
            return {DICT: [[k, encode(v, child(k))] for k, v in value.items()]}
        raise TypeError(f"{path}: a {type(value).__name__} cannot be saved in a checkpoint")

    return encode(state, ""), tensors


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `flatten`. A malformed skeleton raises KeyError, TypeError or ValueError."""
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if len(skeleton) == 1 and (tag := next(iter(skeleton))) in TAGS:
        body = skeleton[tag]
        if tag == TENSOR:
            return tensors[body]
        if not isinstance(body, list):
            raise TypeError(f"{tag} holds a {type(body).__name__}, not a list")
        if tag == TUPLE:
            return tuple(unflatten(v, tensors) for v in body)
        return {key: unflatten(value, tensors) for key, value in body}
    return {k: unflatten(v, tensors) for k, v in skeleton.items()}


def write(folder: Path, name: str, header: dict, state: Any) -> None:
    """NAME.safetensors (the state's tensors) and NAME.json (header and the state's skeleton) in folder."""
    from safetensors.torch import save_file

    skeleton, tensors = flatten(state)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps({**header, "state": skeleton}) + "\n")


def read_header(folder: Path, name: str, where: str) -> dict:
    """NAME.json of folder, checked to be this format's."""
    try:
        header = json.loads((folder / f"{name}.json").read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where}: cannot read {name}.json: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{where}: {name}.json is not a vqtok checkpoint's")
    if header.get("version") != VERSION:
        raise CheckpointError(
            f"{where}: {name}.json is version {header.get('version')!r} of the checkpoint format; this vqtok "
            f"reads version {VERSION}"
        )
    return header


def read_state(folder: Path, name: str, header: dict, where: str) -> Any:
    """The state NAME.json's skeleton and NAME.safetensors' tensors make."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(folder / f"{name}.safetensors"))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{where}: cannot read {name}.safetensors: {exc}") from None
    try:
        return unflatten(header.get("state"), tensors)
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where}: {name}.json is malformed: {exc!r}") from None


def random_state() -> dict:
    """This process's random states: Python's, NumPy's (global), torch's on the CPU and on each GPU."""
    algorithm, keys, *rest = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (algorithm, keys.tolist(), *rest), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict) -> None:
    """The inverse of `random_state`. GPU states are set where there are GPUs (a run resumed on the CPU draws
    there from its restored CPU state)."""
    random.setstate(state["python"])
    algorithm, keys, *rest = state["numpy"]
    np.random.set_state((algorithm, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_shared(folder: Path, step: int, objects: dict, processes: int) -> None:
    """From the main process: state.json and state.safetensors, the state_dict of each of objects by name."""
    header = {"format": FORMAT, "version": VERSION, "step": step, "processes": processes}
    write(folder, STATE, header, {name: obj.state_dict() for name, obj in objects.items()})


def save_random_state(folder: Path, rank: int) -> None:
    """From every process: its own rng-RANK.json and rng-RANK.safetensors."""
    write(folder, f"rng-{rank}", {"format": FORMAT, "version": VERSION}, random_state())


def check_files(folder: Path, where: str) -> None:
    """CheckpointError unless folder holds only files vqtok writes, state.json among them. Nothing is read."""
    names = sorted(os.listdir(folder))
    if f"{STATE}.json" not in names and any(ACCELERATE_NAMES.match(name) for name in names):
        raise CheckpointError(
            f"{where} is in accelerate's format, which earlier vqtok wrote: loading it unpickles its files, which "
            "can run code, so it cannot be resumed safely; train a new run (another --out)"
        )
    expected = {f"{STATE}.json", f"{STATE}.safetensors", COMPLETE_NAME}
    foreign = [name for name in names if name not in expected and not RANDOM_STATE.match(name)]
    if foreign:
        raise CheckpointError(
            f"{where} holds files not written by vqtok ({', '.join(map(repr, foreign))}): it is not resumed from, "
            "since they may have been planted there"
        )
    missing = [name for name in sorted(expected - {COMPLETE_NAME}) if name not in names]
    if missing:
        raise CheckpointError(f"{where} is not a whole vqtok checkpoint: it has no {' or '.join(missing)}")


def load(folder: Path, step: int, objects: dict, rank: int, processes: int, where: str) -> bool:
    """Restore objects (name -> what has load_state_dict) from the checkpoint of `step` in folder, and this
    process's random states. CheckpointError, in one line naming `where`, for anything but a checkpoint of
    this format whose state fits objects. The random states are restored only where as many processes wrote
    the checkpoint as resume it (with another count, the data is split differently anyway); returns whether they
    were."""
    check_files(folder, where)
    header = read_header(folder, STATE, where)
    if header.get("step") != step:
        raise CheckpointError(f"{where}: state.json says step {header.get('step')!r}, its folder step {step}")
    state = read_state(folder, STATE, header, where)
    if not isinstance(state, dict) or set(state) != set(objects):
        held = ", ".join(sorted(map(str, state))) if isinstance(state, dict) else "nothing"
        raise CheckpointError(f"{where} holds {held}, but this run has {', '.join(sorted(objects))}")
    for name, obj in objects.items():
        try:
            obj.load_state_dict(state[name])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__  # torch's own messages span lines
            raise CheckpointError(f"{where}: its {name} does not fit this run's: {reason}") from None
    if header.get("processes") != processes:
        return False
    name = f"rng-{rank}"
    if not (folder / f"{name}.json").is_file():
        raise CheckpointError(f"{where} was written by {processes} processes but has no {name}.json")
    random_header = read_header(folder, name, where)
    try:
        set_random_state(read_state(folder, name, random_header, where))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: {name}.json does not hold random states: {exc!r}") from None
    return True
