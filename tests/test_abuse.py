"""Hostile inputs (issue 9). Files: nothing in a generator file runs, nothing allocates much more than the
file's size, and every refusal is a CheckpointError that names the file as the user knows it.

Layout: common helpers first, then one section per attack surface, each test in a clearly named function.
"""
import collections
import json
import operator
import os
import pickle
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from nada_core.models.tiny import tiny_generator
from nada_core.store.checkpoints import CheckpointError, load_generator, restricted_loads, save_generator
from tests.test_checkpoints import build_ada_like_pickle

ROOT = Path(__file__).resolve().parent.parent


# ===================================================================== common helpers
class Reduce:
    """Pickles as ``fn(*args)``: how an attacker makes unpickling call something."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class StorageRef:
    """Pickles as a torch storage reference (persistent id), with whatever size it claims."""

    def __init__(self, pid):
        self.pid = pid


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, StorageRef) else None


def torch_pickle(obj) -> bytes:
    import io

    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def rebuild(storage, size, stride, offset=0):
    """A tensor record as torch writes it: ``_rebuild_tensor_v2(storage, offset, size, stride, ...)``."""
    return Reduce(torch._utils._rebuild_tensor_v2, storage, offset, tuple(size), tuple(stride), False,
                  collections.OrderedDict())


LEGACY_HEAD = (pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
               + pickle.dumps({"protocol_version": 1001, "little_endian": True,
                               "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2))


def legacy_file(obj, storages: dict | None = None) -> bytes:
    """A pre-1.6 torch.save file: header pickles, ``obj``, the storage keys, then each storage's
    element count and bytes (``storages``: key -> (declared count, raw bytes))."""
    storages = storages or {}
    out = LEGACY_HEAD + torch_pickle(obj) + pickle.dumps(list(storages), protocol=2)
    for count, raw in storages.values():
        out += count.to_bytes(8, "little") + raw
    return out


def legacy_ref(key, numel, dtype=torch.FloatStorage):
    return StorageRef(("storage", dtype, key, "cpu", numel, None))


def zip_file(obj, storages: dict | None = None) -> bytes:
    """A torch.save zip holding ``obj`` (storages: key -> raw bytes)."""
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", torch_pickle(obj))
        z.writestr("archive/byteorder", "little")
        for key, raw in (storages or {}).items():
            z.writestr(f"archive/data/{key}", raw)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def zip_ref(key, numel, dtype=torch.FloatStorage):
    return StorageRef(("storage", dtype, key, "cpu", numel))


def safetensors_file(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def safetensors_parts(path):
    """(header dict, data bytes) of a safetensors file, to build damaged variants from a valid one."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def nada_meta(config) -> dict:
    return {"nada": json.dumps({"format": "nada-studio-generator", "version": 1, "config": config, "meta": {}})}


def assert_refused(path, pattern=None, name="upload.bin"):
    """The file is refused with a CheckpointError that names it by ``name`` only (no server path)."""
    with pytest.raises(CheckpointError, match=pattern) as e:
        load_generator(path, display_name=name)
    message = str(e.value)
    assert message.startswith(f"{name}: ") and e.value.path == name
    assert str(Path(path).parent) not in message
    return message


PROBE = r"""
import json, resource, sys
from nada_core.store.checkpoints import CheckpointError, load_generator

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

for warm in sys.argv[1].split(","):  # the same code paths once on valid files, so only the attacks are measured
    load_generator(warm)
try:  # a regression should fail with MemoryError, not exhaust the machine the tests run on
    data_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmData:"))
    limit = (data_kb + 1536 * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
except (OSError, StopIteration, ValueError):
    pass
before, results = peak_mb(), {}
for path in sys.argv[2:]:
    try:
        load_generator(path, display_name="upload")
        results[path] = "loaded"
    except CheckpointError as e:
        results[path] = "CheckpointError: " + str(e)
    except BaseException as e:
        results[path] = f"{type(e).__name__}: {e}"
print(json.dumps({"grew_mb": peak_mb() - before, "results": results}))
"""


def load_in_fresh_process(paths, warm_up):
    """Load each file in a fresh interpreter; returns (peak resident growth in MB, {path: outcome})."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", PROBE, ",".join(map(str, warm_up)), *map(str, paths)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    return report["grew_mb"], report["results"]


# ===================================================================== generator files: code never runs
def code_running_pickles(marker: Path) -> dict[str, bytes]:
    """Every way we know for a pickle to run code, each creating ``marker`` if it ever ran."""
    touch = f"touch {marker}"
    create = f"open({str(marker)!r}, 'w').close()"
    corpus = {}
    for proto in range(6):
        corpus[f"os_system_p{proto}.pkl"] = pickle.dumps({"G_ema": Reduce(os.system, touch)}, protocol=proto)
        corpus[f"eval_p{proto}.pkl"] = pickle.dumps(Reduce(eval, create), protocol=proto)
        corpus[f"exec_p{proto}.pkl"] = pickle.dumps(Reduce(exec, create), protocol=proto)
    assert pickle.STACK_GLOBAL in corpus["os_system_p4.pkl"] and pickle.STACK_GLOBAL in corpus["os_system_p5.pkl"]
    # hand-written text opcodes: getattr(__import__('os'), 'system')(...), INST, OBJ; also behind a PROTO 2
    # header so that they pass the "is it a pickle" sniff
    text = {
        "getattr": f"c__builtin__\ngetattr\n(c__builtin__\n__import__\n(Vos\ntRVsystem\ntR(V{touch}\ntR.",
        "inst": f"(V{touch}\nios\nsystem\n.",
        "obj": f"(cos\nsystem\nV{touch}\no.",
        "subprocess": f"csubprocess\ncall\n((Vsh\nV-c\nV{touch}\nltR.",
    }
    for name, ops in text.items():
        corpus[f"{name}_p0.pkl"] = ops.encode()
        corpus[f"{name}_p2header.pkl"] = b"\x80\x02" + ops.encode()
    evil = pickle.dumps(Reduce(os.system, touch), protocol=2)
    corpus["legacy_torch.pt"] = LEGACY_HEAD + evil
    corpus["legacy_torch_after_storages.pt"] = legacy_file({"g_ema": {}}) + evil  # trailing bytes are never read
    corpus["torch_zip.pt"] = zip_file(Reduce(os.system, touch))
    nested = LEGACY_HEAD + evil  # a storage blob that is itself a hostile torch file
    corpus["nested_blob.pkl"] = pickle.dumps({"G_ema": Reduce(torch.storage._load_from_bytes, nested)}, protocol=4)
    corpus["tensor_setstate.pkl"] = pickle.dumps(Reduce(getattr, torch.Tensor, "__setstate__"), protocol=2)
    return corpus


def test_code_running_pickles_never_run(tmp_path):
    marker = tmp_path / "pwned"
    for name, data in code_running_pickles(marker).items():
        path = tmp_path / name
        path.write_bytes(data)
        # protocols 0 and 1 do not even look like a generator file; the rest are refused at the call
        reason = "unrecognised file type" if data[:1] not in (b"\x80", b"P") else "does not fit" if "after" in name else "calls "
        assert_refused(path, reason, name=name)
        assert not marker.exists(), name
        if name.endswith(".pkl"):  # the unpickler itself refuses, whatever the file-type sniff said
            with pytest.raises(CheckpointError, match="calls "):
                restricted_loads(data)
            assert not marker.exists(), name


def test_a_real_layout_pickle_with_an_os_system_call_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    build_ada_like_pickle(tiny_generator(seed=5, size=64, channel_multiplier=2, channel_max=48),
                          tmp_path / "ffhq.pkl", marker, evil=True)
    assert "system" in assert_refused(tmp_path / "ffhq.pkl", name="ffhq.pkl")
    assert not marker.exists()


# ===================================================================== generator files: bounded memory
def allocating_files() -> dict[str, tuple[bytes, str]]:
    """Small files that ask for gigabytes: name -> (bytes, the reason each must be refused for)."""
    float4 = torch.arange(4, dtype=torch.float32).numpy().tobytes()
    blob = b"\0" * (256 * 1024)  # an honest storage blob, pickled once and referenced by every call below
    blob_file = (LEGACY_HEAD + torch_pickle(legacy_ref("0", len(blob) // 4)) + pickle.dumps(["0"], protocol=2)
                 + (len(blob) // 4).to_bytes(8, "little") + blob)
    # Tensor.__setstate__((storage, offset, size, stride)) calls set_(), which grows the storage to fit
    setstate = (b"\x80\x02" + torch_pickle(rebuild(legacy_ref("0", 4), [4], [1]))[2:-1]
                + torch_pickle((legacy_ref("0", 4), 0, (2 ** 32,), (1,)))[2:-1] + b"b.")
    huge_storage = "a storage declares 68719476736 bytes but only"
    return {
        "bytearray_2_31.pkl": (pickle.dumps(Reduce(bytearray, 2 ** 31), protocol=2), "calls __builtin__.bytearray"),
        "bytes_2_33.pkl": (pickle.dumps(Reduce(bytes, 2 ** 33), protocol=4), "calls builtins.bytes"),
        "str_mul.pkl": (pickle.dumps(Reduce(operator.mul, "x", 2 ** 32), protocol=3), "calls _operator.mul"),
        "bytearray8_opcode.pkl": (b"\x80\x05\x96" + (2 ** 33).to_bytes(8, "little") + b".", "a byte array of"),
        "object_flood.pkl": (b"\x80\x04(" + b"\x8f" * 2_000_000 + b"l.", "objects"),  # two million empty sets
        "class_flood.pkl": (b"\x80\x02(" + b"".join(b"cm\nC%d\n" % i for i in range(300_000)) + b"l.", "classes"),
        # storages declared far larger than the bytes behind them
        "legacy_storage_2_34.pt": (legacy_file({"g_ema": {"w": rebuild(legacy_ref("0", 2 ** 34), [4], [1])}},
                                               {"0": (4, float4)}), huge_storage),
        "zip_storage_2_34.pt": (zip_file({"g_ema": {"w": rebuild(zip_ref("0", 2 ** 34), [4], [1])}}, {"0": float4}),
                                huge_storage),
        "nested_blob_2_34.pkl": (pickle.dumps({"G_ema": rebuild(Reduce(
            torch.storage._load_from_bytes, LEGACY_HEAD + torch_pickle(legacy_ref("0", 2 ** 34))
            + pickle.dumps(["0"], protocol=2) + (2 ** 34).to_bytes(8, "little") + float4), [4], [1])}, protocol=4),
            huge_storage),
        # tensors larger than their small, honest storages (torch would grow the storage to fit)
        "zip_huge_view.pt": (zip_file({"g_ema": {"w": rebuild(zip_ref("0", 4), [2 ** 17, 2 ** 17], [1, 1])}},
                                      {"0": float4}), "reaches outside its storage"),
        "zip_stride0_alias.pt": (zip_file({"g_ema": {"w": rebuild(zip_ref("0", 4), [2 ** 31], [0])}}, {"0": float4}),
                                 "reaches outside its storage"),
        "legacy_setstate_resize.pt": (LEGACY_HEAD + setstate + pickle.dumps(["0"], protocol=2)
                                      + (4).to_bytes(8, "little") + float4, "sets the state of a Tensor"),
        # one honest blob referenced 10,000 times: each reference would become its own storage
        "repeated_blob.pkl": (pickle.dumps({"G_ema": [Reduce(torch.storage._load_from_bytes, blob_file)
                                                      for _ in range(10_000)]}, protocol=4), "more than the file holds"),
        "safetensors_giant_config.safetensors": (safetensors_file({"__metadata__": nada_meta(
            {"size": 1024, "style_dim": 1024, "n_mlp": 16, "channel_multiplier": 4, "channel_max": 1024})}),
            "tensors of the .* generator are missing"),
    }


def test_allocation_bombs_are_refused_with_little_memory(tmp_path):
    corpus = allocating_files()
    assert len(corpus["bytearray_2_31.pkl"][0]) < 64 and len(corpus["safetensors_giant_config.safetensors"][0]) < 400
    paths = []
    for name, (data, _) in corpus.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    G = tiny_generator(seed=1)
    warm = [save_generator(G, tmp_path / "warm.safetensors")]
    build_ada_like_pickle(tiny_generator(seed=5, size=64, channel_max=48), tmp_path / "warm.pkl", tmp_path / "pwned")
    torch.save({"g_ema": G.state_dict()}, tmp_path / "warm.pt")
    torch.save({"g_ema": G.state_dict()}, tmp_path / "warm_legacy.pt", _use_new_zipfile_serialization=False)
    warm += [tmp_path / "warm.pkl", tmp_path / "warm.pt", tmp_path / "warm_legacy.pt"]
    grew_mb, results = load_in_fresh_process(paths, warm)
    for path in paths:
        outcome = results[str(path)]
        assert outcome.startswith("CheckpointError: upload: ") and str(tmp_path) not in outcome, (path.name, outcome)
        assert re.search(corpus[path.name][1], outcome), (path.name, outcome)
    assert grew_mb < 100, (grew_mb, results)


# ===================================================================== generator files: malformed safetensors
def test_malformed_safetensors_are_refused_quickly(tmp_path):
    G = tiny_generator(seed=2)
    header, data = safetensors_parts(save_generator(G, tmp_path / "good.safetensors"))
    cfg = json.loads(header["__metadata__"]["nada"])["config"]
    a, b = "style.1.weight", "style.2.weight"  # same shape

    def variant(**changes):
        h = json.loads(json.dumps(header))
        for key, value in changes.items():
            h[key] = value
        return h

    def entry(key, **fields):
        return {**header[key], **fields}

    cases = {
        "header_beyond_file": (10 ** 9).to_bytes(8, "little") + b'{"a": 1}',
        "header_not_json": (5).to_bytes(8, "little") + b"{abc}",
        "huge_shape": safetensors_file(variant(**{a: entry(a, shape=[2 ** 40, 2 ** 40])}), data),
        "overlapping": safetensors_file(variant(**{b: entry(b, data_offsets=header[a]["data_offsets"])}), data),
        "outside_data": safetensors_file(variant(**{a: entry(a, data_offsets=[len(data), len(data) + 4 * 64])}), data),
        "size_2_20": safetensors_file(variant(__metadata__=nada_meta({**cfg, "size": 2 ** 20})), data),
        "channel_multiplier_64": safetensors_file(variant(__metadata__=nada_meta({**cfg, "channel_multiplier": 64})), data),
        "style_dim_huge": safetensors_file(variant(__metadata__=nada_meta({**cfg, "style_dim": 10 ** 6})), data),
        "extra_config_key": safetensors_file(variant(__metadata__=nada_meta({**cfg, "blur_kernel": [1] * 10 ** 5})), data),
        "config_not_a_dict": safetensors_file(variant(__metadata__=nada_meta([1, 2])), data),
        "metadata_not_json": safetensors_file(variant(__metadata__={"nada": "not json {"}), data),
        "int_dtype": safetensors_file(variant(**{a: entry(a, dtype="I64")}), data),
        "unexpected_tensor": safetensors_file(variant(extra=entry(a)), data),
        "missing_tensor": safetensors_file({k: v for k, v in header.items() if k != a}, data),
        "bigger_config_than_file": safetensors_file(variant(__metadata__=nada_meta({**cfg, "size": 1024})), data),
    }
    for name, raw in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(raw)
        start = time.perf_counter()
        assert_refused(path, name=path.name)
        assert time.perf_counter() - start < 2.0, name
    assert load_generator(tmp_path / "good.safetensors", display_name="good")[1]["config"] == cfg


def test_refusals_never_show_the_server_path(tmp_path):
    """Errors from the OS or from parsers quote paths; with a display name, the message has only that."""
    folder = tmp_path / "srv" / "secret-folder"
    folder.mkdir(parents=True)
    (folder / "dir.pt").mkdir()
    (folder / "empty.pt").write_bytes(b"")
    (folder / "zip.pt").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    (folder / "short.pkl").write_bytes(b"\x80\x04\x95")
    for name in ("dir.pt", "empty.pt", "zip.pt", "short.pkl", "absent.pt"):
        message = assert_refused(folder / name, name="my model")
        assert "secret-folder" not in message


# ===================================================================== bombs in text fields, measured apart
BOMB_PROBE = r"""
import json, resource, sys, time

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

exec(sys.argv[1])   # imports and warm-up: what every call below needs, so only the calls are measured
before, results = peak_mb(), {}
for name, call in json.loads(sys.argv[2]).items():
    t0 = time.perf_counter()
    try:
        outcome = "returned " + repr(eval(call))[:200]
    except BaseException as e:
        outcome = f"{type(e).__name__}: {str(e)[:300]}"
    results[name] = {"outcome": outcome, "seconds": time.perf_counter() - t0}
print(json.dumps({"grew_mb": peak_mb() - before, "results": results}))
"""


def bombs_in_fresh_process(setup: str, calls: dict[str, str]):
    """Run each call (a Python expression) after ``setup`` in a fresh interpreter; returns (peak resident growth in
    MB over all calls, {name: {"outcome": 'returned ...' or 'ErrorType: message', "seconds": wall time}})."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", BOMB_PROBE, setup, json.dumps(calls)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    return report["grew_mb"], report["results"]


def assert_refused_cheaply(grew_mb, results, expected: dict[str, str]):
    """Every call raised ValueError (or a subclass) matching its pattern, within a second, and together they grew
    the process by less than 50 MB."""
    for name, pattern in expected.items():
        outcome, seconds = results[name]["outcome"], results[name]["seconds"]
        assert re.match(r"\w*(Error|Refused|Model): ", outcome) and re.search(pattern, outcome), (name, outcome)
        assert seconds < 1.0, (name, seconds)
    assert grew_mb < 50, (grew_mb, results)


def test_seed_range_bombs_are_counted_before_they_are_built():
    calls = {"range_1e8": "parse_seeds('0-100000000', limit=16)",
             "range_1e11": "parse_seeds('0-99999999999', limit=16, field='Mix seeds')",
             "many_ranges": "parse_seeds(','.join(['0-4294967295'] * 12), limit=16)",
             "long_text": "parse_seeds('1,' * 5_000_000, limit=16)",
             "huge_number": "parse_seeds('9' * 100_000, limit=16)"}
    grew_mb, results = bombs_in_fresh_process("from nada_core.latent.sampling import parse_seeds\n"
                                              "parse_seeds('0-15', limit=16)", calls)
    assert_refused_cheaply(grew_mb, results, {
        "range_1e8": r"^ValueError: Seeds: 100000001 seeds asked for; at most 16 at once",
        "range_1e11": r"^ValueError: Mix seeds must be between 0 and 4294967295",
        "many_ranges": r"at most 16 at once",
        "long_text": r"^ValueError: Seeds: at most 200 characters",
        "huge_number": r"at most 200 characters"})
    from nada_core.latent.sampling import parse_seeds

    assert parse_seeds("0-3, 7,9-10", limit=16) == [0, 1, 2, 3, 7, 9, 10]   # the callers' lists still work
    assert parse_seeds("4294967295") == [4294967295]


def test_json_from_files_is_bounded_in_size_and_depth_before_it_is_parsed(tmp_path):
    from nada_core.store.bounded_json import JSONRefused, loads

    G = tiny_generator(seed=2)
    good = save_generator(G, tmp_path / "good.safetensors")
    header, data = safetensors_parts(good)
    deep = "[" * 100_000 + "]" * 100_000
    for name, recipe in {"deep": '{"base": "tiny", "recipe": ' + deep + "}", "big": '{"base": "tiny", "recipe": {"target": "'
                         + "x" * (50 << 20) + '"}}', "list": "[1, 2]", "recipe_list": '{"recipe": [1]}'}.items():
        (tmp_path / "lib" / name).mkdir(parents=True)
        (tmp_path / "lib" / name / "recipe.json").write_text(recipe)
        (tmp_path / "lib" / name / "final.safetensors").write_bytes(good.read_bytes())
    deep_meta = {**header, "__metadata__": {"nada": '{"format": "nada-studio-generator", "meta": ' + deep + "}"}}
    (tmp_path / "deep_meta.safetensors").write_bytes(safetensors_file(deep_meta, data))
    big_header = {**header, "__metadata__": {**header["__metadata__"], "padding": "x" * (50 << 20)}}
    (tmp_path / "big_header.safetensors").write_bytes(safetensors_file(big_header, data))
    lib = tmp_path / "lib"
    calls = {name: f"RunFolder({str(lib / name)!r}).read_record()" for name in ("deep", "big", "list", "recipe_list")}
    calls["listing"] = f"[e.name for e in list_library(Path({str(lib)!r}))]"
    calls.update({name: f"load_generator({str(tmp_path / name)!r}, display_name={name!r})"
                  for name in ("deep_meta.safetensors", "big_header.safetensors")})
    grew_mb, results = bombs_in_fresh_process(
        "from pathlib import Path\nfrom nada_core.store.runs import RunFolder\nfrom nada_core.store.library import "
        f"list_library\nfrom nada_core.store.checkpoints import load_generator\nload_generator({str(good)!r})", calls)
    assert results["listing"]["outcome"] == "returned []" and results["listing"]["seconds"] < 1.0
    del results["listing"]
    assert_refused_cheaply(grew_mb, results, {
        "deep": r"^JSONRefused: deep: recipe.json nests deeper than 32 levels",
        "big": r"^JSONRefused: big: recipe.json is larger than 1.0 MiB",
        "list": r"recipe.json is a JSON array where a JSON object was expected",
        "recipe_list": r"^ValueError: recipe_list: recipe.json does not describe a run",
        "deep_meta.safetensors": r"^CheckpointError: deep_meta.safetensors: .*metadata nests deeper than 32 levels",
        "big_header.safetensors": r"^CheckpointError: big_header.safetensors: its header is 50 MiB, more than the 4 MiB"})
    with pytest.raises(JSONRefused, match="meta is a JSON text where a JSON object was expected"):
        loads('"just text"', "meta")
    assert loads('{"a": "' + "[" * 40 + '"}', "meta") == {"a": "[" * 40}  # texts are not nesting


def test_text_fields_are_bounded_on_the_server(tmp_path, capsys, monkeypatch):
    from nada_core.__main__ import main

    setup = ("from pathlib import Path\nfrom nada_core.training.adapt import Recipe\n"
             "from nada_core.training.mapper import MapperRecipe, optimise_edit\n"
             "from nada_core.store.library import add_model, check_new_name\n"
             "from nada_core.guidance.clip_guide import check_prompts\n"
             "big = 'x' * (50 << 20)\nRecipe(target='sketch', clip_models=['tiny'], clip_weights=[1.0]).validate(8)")
    root = str(tmp_path / "lib")
    calls = {"target": "Recipe(target=big).validate(8)", "source": "Recipe(source=big, style_images=['a.png']).validate(8)",
             "prompt_check": "check_prompts('photo', big)", "mapper_text": "MapperRecipe(text=big).validate()",
             "edit_text": "optimise_edit(None, None, big, [])",
             "rename": f"check_new_name(big, Path({root!r}))", "mix_name": f"add_model(Path({root!r}), big, None, 'tiny', {{}})"}
    grew_mb, results = bombs_in_fresh_process(setup, calls)
    assert_refused_cheaply(grew_mb, results, {
        "target": r"the target text must be at most 300 characters \(got 52428800\)",
        "source": r"the source text must be at most 300 characters",
        "prompt_check": r"^PromptError: the target text must be at most 300 characters",
        "mapper_text": r"the text must be at most 300 characters", "edit_text": r"the edit text must be at most 300",
        "rename": r"a model name is at most 80 characters", "mix_name": r"a model name is at most 80 characters"})
    assert not (tmp_path / "lib").exists() or not list((tmp_path / "lib").iterdir())   # nothing was created

    from nada_core.training.adapt import Recipe

    with pytest.raises(ValueError, match="iterations must be between.*; batch must be between"):   # every problem at once
        Recipe(target="sketch", iterations=0, batch=0).validate(8)
    with pytest.raises(ValueError, match="wrong type"):   # as a recipe.json may hold it
        Recipe.from_dict({"target": "sketch", "iterations": "many"}).validate(8)
    lib = tmp_path / "cli-lib"
    monkeypatch.setenv("NADA_LIBRARY_DIR", str(lib))
    assert main(["adapt", "--base", "tiny", "--clip", "tiny", "--target", "x" * 5000]) == 1
    err = capsys.readouterr().err
    assert "error: the target text must be at most 300 characters (got 5000)" in err and "Traceback" not in err
    assert not lib.exists() or not list(lib.iterdir())


def test_library_names_never_take_a_reserved_folder(tmp_path):
    from nada_core.store.library import add_model, check_new_name, import_model, list_library, rename_model
    from nada_core.store.runs import MAPPERS, RESERVED, SNAPSHOTS, TINY, TRASH

    assert {TRASH, MAPPERS, TINY, SNAPSHOTS} <= RESERVED
    root = tmp_path / "lib"
    G = tiny_generator(seed=1)
    first = add_model(root, "Mine", G, "tiny", {"source": "photo", "target": "mine"})
    for name in ("mappers", "Mappers", "snapshots", " MAPPERS "):
        with pytest.raises(ValueError, match="one of the library's own folders"):
            check_new_name(name, root)
        with pytest.raises(ValueError, match="one of the library's own folders"):
            rename_model(root, first.name, name)
    assert [e.name for e in list_library(root)] == ["mine"]
    mix = add_model(root, "mappers", G, "tiny", {"source": "tiny", "target": "mappers"})   # a mix's or import's name
    torch.save({"g_ema": G.state_dict()}, tmp_path / "snapshots.pt")
    imported = import_model(root, tmp_path / "snapshots.pt", "snapshots.pt", "tiny", tiny_generator())
    assert (mix.name, imported.name) == ("mappers-2", "snapshots-2")
    assert not (root / MAPPERS).exists() and not (root / SNAPSHOTS).exists()


# ===================================================================== non-finite weights
def _poisoned(seed=0, name="convs.0.conv.weight", value=float("nan")):
    G = tiny_generator(seed=seed)
    with torch.no_grad():
        G.state_dict()[name].view(-1)[3] = value
    return G


def test_non_finite_weights_are_refused_wherever_a_generator_or_delta_is_read(tmp_path):
    from safetensors.torch import save_file

    from nada_core.store.delta import DeltaError, apply_delta, export_delta, read_delta
    from nada_core.store.library import add_model, import_file, list_library

    base = tiny_generator()
    save_generator(_poisoned(), tmp_path / "nan.safetensors")
    torch.save({"g_ema": _poisoned(value=float("inf")).state_dict()}, tmp_path / "inf.pt")
    assert "tensor 'convs.0.conv.weight' holds NaN or infinite values" in assert_refused(
        tmp_path / "nan.safetensors", name="nan.safetensors")
    assert "holds NaN or infinite values" in assert_refused(tmp_path / "inf.pt", name="inf.pt")
    lib = tmp_path / "lib"
    with pytest.raises(CheckpointError, match="inf.pt: tensor 'convs.0.conv.weight' holds NaN"):
        import_file(lib, tmp_path / "inf.pt", "inf.pt", "tiny", base)
    with pytest.raises(ValueError, match="mix: tensor 'convs.0.conv.weight' holds NaN or infinite values"):
        add_model(lib, "mix", _poisoned(), "tiny", {})   # a mix that overflowed, say
    with pytest.raises(DeltaError, match="the model's tensor 'convs.0.conv.weight' holds NaN"):
        export_delta(_poisoned(), base, {}, tmp_path / "never.nada.safetensors")
    assert not (tmp_path / "never.nada.safetensors").exists()

    # deltas: a NaN difference, and integer or bool tensors, which no difference of weights is
    good = export_delta(tiny_generator(seed=0), base, {"source_model": "tiny"}, tmp_path / "good.nada.safetensors")
    diffs, _ = read_delta(good)
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        metadata = f.metadata()
    name = "convs.2.conv.weight"
    variants = {"nan": {name: torch.full((1, 16, 16, 3, 3), float("nan"))},
                "int": {name: torch.zeros(1, 16, 16, 3, 3, dtype=torch.int64)},
                "bool": {name: torch.zeros(1, 16, 16, 3, 3, dtype=torch.bool)}}
    for kind, tensors in variants.items():
        path = tmp_path / f"{kind}.nada.safetensors"
        save_file({**diffs, **tensors}, path, metadata=metadata)
        with pytest.raises(DeltaError, match=f"^{kind}.nada.safetensors: not a NADA delta: tensor '{name}' "
                                             + ("holds NaN or infinite values" if kind == "nan" else
                                                "is (I64|BOOL); a delta holds floating-point differences only")):
            apply_delta(path, base, display_name=path.name)
        with pytest.raises(DeltaError, match="not a NADA delta"):
            import_file(lib, path, path.name, "tiny", base)
    assert list_library(lib) == [] and (not lib.exists() or not list(lib.iterdir()))   # nothing added, not even a folder


# ===================================================================== style deltas: malformed metadata
def delta_with_metadata(path, text: str, tensors=None):
    """A delta file whose ``nada-delta`` metadata is ``text``, exactly (valid JSON or not)."""
    from safetensors.torch import save_file

    save_file(tensors or {"convs.2.noise.weight": torch.zeros(1)}, path, metadata={"nada-delta": text})
    return path


def test_malformed_delta_metadata_is_not_a_nada_delta_in_the_core_and_the_cli(tmp_path, capsys):
    from nada_core.__main__ import main
    from nada_core.store.delta import DeltaError, apply_delta, delta_info, export_delta, read_delta
    from nada_core.store.library import import_file

    base = tiny_generator()
    good = export_delta(tiny_generator(seed=4), base, {"source_model": "tiny", "recipe": {"target": "x"}},
                        tmp_path / "good.nada.safetensors")
    header = delta_info(good)

    def variant(**changes):
        return json.dumps({**header, **changes})

    cases = {
        "meta_list": (variant(meta=[1, 2]), "its meta is a JSON array, not a JSON object"),
        "meta_text": (variant(meta="source_model"), "its meta is a JSON text"),
        "recipe_list": (variant(meta={"recipe": ["target"]}), "its recipe is a JSON array, not a JSON object"),
        "recipe_number": (variant(meta={"source_model": "tiny", "recipe": 5}), "its recipe is a JSON number"),
        "source_model_dict": (variant(meta={"source_model": {"path": "/etc/passwd"}}), "source_model is not a name"),
        "header_list": ("[1, 2, 3]", "its metadata is a JSON array where a JSON object was expected"),
        "header_null": ("null", "its metadata is JSON null"),
        "deep": ('{"format": "nada-studio-delta", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}",
                 "its metadata nests deeper than 32 levels"),
        "not_json": ("{format: nada", "its metadata is not valid JSON"),
        "config_list": (variant(config=[64]), "generator config must be a JSON object"),
        "no_fingerprint": (variant(base_fingerprint=None), "base fingerprint is not a sha256"),
        "long_target": (variant(meta={"recipe": {"target": "x" * 5000}}), "target text must be at most 300 characters"),
    }
    lib = tmp_path / "lib"
    for name, (text, why) in cases.items():
        path = delta_with_metadata(tmp_path / f"{name}.nada.safetensors", text)
        for call in (lambda: read_delta(path, path.name), lambda: delta_info(path, path.name),
                     lambda: apply_delta(path, base, path.name), lambda: import_file(lib, path, path.name, "tiny", base)):
            with pytest.raises(DeltaError) as e:
                call()
            assert str(e.value).startswith(f"{path.name}: not a NADA delta: ") and why in str(e.value), (name, str(e.value))
        assert main(["delta", "apply", str(path), "--base", "tiny", "--out", str(tmp_path / "out.safetensors")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "not a NADA delta: " in err and why in err and "Traceback" not in err, err
    # damaged deltas are described as deltas, not as generator files
    (tmp_path / "cut.nada.safetensors").write_bytes(good.read_bytes()[:500])
    with pytest.raises(DeltaError, match=r"^cut.nada.safetensors: not a NADA delta: file is damaged or truncated"):
        import_file(lib, tmp_path / "cut.nada.safetensors", "cut.nada.safetensors", "tiny", base)
    renamed = tmp_path / "upload.safetensors"   # the name says nothing; the header says delta
    renamed.write_bytes(delta_with_metadata(tmp_path / "x.safetensors", variant(meta=[1])).read_bytes())
    with pytest.raises(DeltaError, match="upload.safetensors: not a NADA delta: its meta is a JSON array") as e:
        import_file(lib, renamed, renamed.name, "tiny", base)
    assert "Expected a StyleGAN2 generator" not in str(e.value)
    assert not lib.exists() or not list(lib.iterdir())


def test_a_delta_with_a_50_mb_recipe_target_is_refused_at_import_with_little_memory(tmp_path):
    from nada_core.store.delta import delta_info, export_delta

    base = tiny_generator()
    good = export_delta(tiny_generator(seed=4), base, {"source_model": "tiny"}, tmp_path / "good.nada.safetensors")
    huge = {**delta_info(good), "meta": {"source_model": "tiny", "recipe": {"target": "x" * (50 << 20)}}}
    delta_with_metadata(tmp_path / "huge.nada.safetensors", json.dumps(huge))
    delta_with_metadata(tmp_path / "deep.safetensors", json.dumps(delta_info(good))[:-1] + ', "x": ' + "[" * 100_000
                        + "]" * 100_000 + "}")
    lib = tmp_path / "lib"
    setup = ("from pathlib import Path\nfrom nada_core.models.tiny import tiny_generator\n"
             "from nada_core.store.library import import_file\nbase = tiny_generator()\n"
             f"import_file(Path({str(tmp_path / 'warm')!r}), Path({str(good)!r}), 'good.nada.safetensors', 'tiny', base)")
    calls = {name: f"import_file(Path({str(lib)!r}), Path({str(tmp_path / name)!r}), {name!r}, 'tiny', base)"
             for name in ("huge.nada.safetensors", "deep.safetensors")}
    grew_mb, results = bombs_in_fresh_process(setup, calls)
    assert_refused_cheaply(grew_mb, results, {
        "huge.nada.safetensors": r"^DeltaError: huge.nada.safetensors: not a NADA delta: its header is 50 MiB, more "
                                 r"than the 4 MiB",
        "deep.safetensors": r"^DeltaError: deep.safetensors: not a NADA delta: its metadata nests deeper than 32"})
    assert not lib.exists() or not list(lib.iterdir())


def test_delta_apply_never_opens_a_base_path_written_in_the_delta(tmp_path, capsys, monkeypatch):
    from nada_core.__main__ import main
    from nada_core.store.delta import export_delta

    monkeypatch.setenv("NADA_LIBRARY_DIR", str(tmp_path / "lib"))
    base = tiny_generator()
    base_file = save_generator(base, tmp_path / "the-right-base.safetensors")   # it would even fit
    for recorded in (str(base_file), "/etc/passwd", "../../etc/passwd"):
        path = export_delta(tiny_generator(seed=4), base, {"source_model": recorded}, tmp_path / "s.nada.safetensors")
        assert main(["delta", "apply", str(path), "--out", str(tmp_path / "out.safetensors")]) == 1
        err = capsys.readouterr().err
        assert "is not 'tiny', a weights manifest name or a library model; pass --base" in err, err
        assert recorded not in err and not (tmp_path / "out.safetensors").exists()
    # a library model is a base by its name
    from nada_core.store.library import add_model

    add_model(tmp_path / "lib", "My Base", base, "tiny", {})
    path = export_delta(tiny_generator(seed=4), base, {"source_model": "my-base"}, tmp_path / "s.nada.safetensors")
    assert main(["delta", "apply", str(path), "--out", str(tmp_path / "out.safetensors")]) == 0
    assert "base my-base" in capsys.readouterr().out


# ===================================================================== a full disk while writing into the library
def test_a_full_disk_during_import_or_mix_save_leaves_no_model_folder(tmp_path, monkeypatch):
    import errno

    from nada_core.store.delta import export_delta
    from nada_core.store.library import add_model, import_file, list_library

    base = tiny_generator()
    lib = tmp_path / "lib"
    add_model(lib, "kept", base, "tiny", {})
    torch.save({"g_ema": tiny_generator(seed=3).state_dict()}, tmp_path / "upload.pt")
    delta = export_delta(tiny_generator(seed=4), base, {"source_model": "tiny"}, tmp_path / "gift.nada.safetensors")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def thumbnail(G):
        from PIL import Image

        return Image.new("RGB", (4, 4))

    attempts = {"import": lambda: import_file(lib, tmp_path / "upload.pt", "upload.pt", "tiny", base),
                "delta": lambda: import_file(lib, delta, delta.name, "tiny", base),
                "mix": lambda: add_model(lib, "a mix", tiny_generator(seed=5), "tiny", {}, thumbnail)}
    for writer in ("safetensors.torch.save_file", "PIL.Image.Image.save", "pathlib.Path.write_text"):
        with monkeypatch.context() as m:
            m.setattr(writer, disk_full)
            for what, attempt in attempts.items():
                if writer == "PIL.Image.Image.save" and what != "mix":   # only written when a thumbnail is asked for
                    continue
                with pytest.raises(OSError) as e:
                    attempt()
                assert e.value.errno == errno.ENOSPC, (writer, what)
                assert sorted(p.name for p in lib.iterdir()) == ["kept"], (writer, what)   # no empty or .part folder
    assert [e.name for e in list_library(lib)] == ["kept"]
    assert import_file(lib, delta, delta.name, "tiny", base).name == "gift"   # with space again, it works


# ===================================================================== batch jobs files
def test_check_refuses_path_bases_and_reports_every_bad_field_of_every_job(tmp_path, capsys):
    from nada_core.__main__ import main
    from nada_core.store.library import add_model
    from tests.test_batch import TINY

    save_generator(tiny_generator(), tmp_path / "base.safetensors")   # even a real generator file is no base
    lib = tmp_path / "lib"
    add_model(lib, "Mine", tiny_generator(seed=2), "tiny", {})
    (tmp_path / "jobs.toml").write_text(TINY + """
[[job]]
name = "passwd"
target = "sketch"
base = "/etc/passwd"

[[job]]
name = "many"
base = "../base.safetensors"
target = "x"
iterations = 0
batch = 1000
k = 99
mixing = 2.0
clip = []

[[job]]
name = "also-bad"
base = "base.safetensors"
lr = 5.0
preset = "everything"
target = "sketch"

[[job]]
name = "mappers"
target = "sketch"

[[job]]
name = "on-mine"
base = "mine"
target = "sketch"
""")
    assert main(["batch", str(tmp_path / "jobs.toml"), "--library", str(lib), "--check"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "nothing was run" in err and "root:" not in err   # /etc/passwd was never read
    for expected in ["job 1 ('passwd'): base '/etc/passwd' is not 'tiny', a weights manifest name",
                     "never as a file path",
                     "job 2 ('many'): base '../base.safetensors' is not 'tiny'",
                     "job 2 ('many'): clip must name one or more CLIP models",
                     "job 2 ('many'): iterations must be between 1 and 100000",
                     "job 2 ('many'): batch must be between 1 and 64",
                     "job 2 ('many'): mixing probability must be in [0, 1]",
                     "job 2 ('many'): k must be between 1 and 18",     # the base is unknown: the most W+ slots
                     "job 3 ('also-bad'): base 'base.safetensors' is not 'tiny'",
                     "job 3 ('also-bad'): learning rate must be in (0, 1]",
                     "job 3 ('also-bad'): preset must be one of",
                     "job 4 ('mappers'): name 'mappers' cannot be a model name"]:
        assert expected in err, (expected, err)
    assert "job 5" not in err   # a library model is a base by its name
    assert err.count("\n  job ") == 11 and "has 11 problems" in err, err
