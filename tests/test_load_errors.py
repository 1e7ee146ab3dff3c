"""Loading: every mistake a user can make ends in one clear LoadError naming the problem and the fix.

Covers the paths a name or folder takes (folder, checkpoints/, Hugging Face cache snapshot,
download), broken checkpoints (missing tensor, wrong shape, corrupt or truncated file,
missing untied head, missing shard), a sharded checkpoint that must load correctly, and a
prompt longer than the context.
"""
import shutil

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from torch.testing import assert_close

import load_weights
from load_weights import LoadError, load, load_model, resolve

SMOL_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"      # the repository of preset smollm2-135m-instruct


@pytest.fixture(autouse=True)
def no_checkpoints_variable(monkeypatch):
    """A name resolves through $NANOSKIP_CHECKPOINTS first: the tests of where a name resolves
    must not see the user's."""
    monkeypatch.delenv("NANOSKIP_CHECKPOINTS", raising=False)


@pytest.fixture
def model_dir(tiny_hf, tmp_path):
    """A private copy of a tiny untied Llama folder, with a tokenizer.json: free to break."""
    _, src = tiny_hf("llama", tie_word_embeddings=False)
    folder = tmp_path / "model"
    shutil.copytree(src, folder)
    tok = Tokenizer(WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def load_error(fn, *args, **kwargs) -> str:
    """The message of the LoadError fn(*args) raises; it must be a single line."""
    with pytest.raises(LoadError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def rewrite_weights(folder, change):
    """Apply change(tensors: dict) to the folder's model.safetensors."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------
# Name or folder
# ----------------------------------------------------------------------------------------------

def test_config_json_that_is_not_an_object(model_dir):
    (model_dir / "config.json").write_text("[1, 2]")
    assert "config.json holds a JSON list, not an object of settings" in load_error(load, str(model_dir))


def test_missing_folder(tmp_path):
    message = load_error(load, str(tmp_path / "no" / "such-model"))
    assert "does not exist" in message and "check the path" in message


def test_folder_without_config(tmp_path):
    message = load_error(load, str(tmp_path))
    assert "has no config.json" in message and "Hugging Face-format model folder" in message


def test_unknown_model_name():
    message = load_error(load, "llama-9")
    assert "unknown model 'llama-9'" in message and "smollm2-135m-instruct" in message


def test_unknown_dtype(model_dir):
    assert "choose one of float32" in load_error(load, str(model_dir), dtype="float64")


def fake_hub_cache(root, repo_id, model_dir, revision="0123abcd"):
    """The Hub cache layout: models--org--name/refs/main names the snapshots/<revision>/ folder."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    return repo / "snapshots" / revision


def test_checkpoints_folder_first(model_dir, tmp_path, monkeypatch):
    """A name found in $NANOSKIP_CHECKPOINTS, in checkpoints/ and in the Hub cache resolves to the
    variable's folder; without the variable, to checkpoints/; never to the cache or a download."""
    name = "smollm2-135m-instruct"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **k: pytest.fail("downloaded although a copy is on this machine"))
    snapshot = fake_hub_cache(tmp_path / "hf", SMOL_REPO, model_dir)
    assert resolve(name) == snapshot                                  # the cache alone: it is found
    shutil.copytree(model_dir, tmp_path / "checkpoints" / name)
    shutil.copytree(model_dir, tmp_path / "mine" / name)
    assert resolve(name).resolve() == tmp_path / "checkpoints" / name
    monkeypatch.setenv("NANOSKIP_CHECKPOINTS", str(tmp_path / "mine"))
    assert resolve(name).resolve() == tmp_path / "mine" / name
    monkeypatch.setenv("NANOSKIP_CHECKPOINTS", str(tmp_path / "empty"))      # a variable without it: on to checkpoints/
    assert resolve(name).resolve() == tmp_path / "checkpoints" / name


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_hub_cache_snapshot(model_dir, tmp_path, monkeypatch, variable):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(variable, str(tmp_path / "hf"))
    hub = tmp_path / "hf" / ("hub" if variable == "HF_HOME" else "")
    snapshot = fake_hub_cache(hub, SMOL_REPO, model_dir)
    monkeypatch.chdir(tmp_path)                        # no checkpoints/ here

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded although the snapshot is cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    assert resolve("smollm2-135m-instruct") == snapshot
    model, tok = load("smollm2-135m-instruct")
    assert model.cfg.n_layers == 2 and tok.encode("hello world") == [1, 2]


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """Nothing cached, no checkpoints/: a preset name must be downloaded."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.chdir(tmp_path)


def test_download(model_dir, empty_hub, monkeypatch):
    asked = []

    def fake_snapshot_download(repo_id, **kwargs):
        asked.append(repo_id)
        return str(model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, _ = load("smollm2-135m-instruct")
    assert asked == [SMOL_REPO]
    assert model.cfg.n_layers == 2


def test_failed_download(empty_hub, monkeypatch):
    def refused(repo_id, **kwargs):
        raise OSError("401 Client Error: Unauthorized for url\nmore detail on a second line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refused)
    message = load_error(load, "smollm2-135m-instruct")
    assert f"could not download {SMOL_REPO}" in message and "401 Client Error" in message
    assert "HF_TOKEN" in message and f"https://huggingface.co/{SMOL_REPO}" in message


# ----------------------------------------------------------------------------------------------
# Broken checkpoints
# ----------------------------------------------------------------------------------------------

def test_missing_tensor(model_dir):
    rewrite_weights(model_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    message = load_error(load_model, model_dir)
    assert "tensor model.layers.1.mlp.up_proj.weight is missing" in message and "download it again" in message


def test_wrong_shape(model_dir):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:, :63].contiguous()
    rewrite_weights(model_dir, shrink)
    message = load_error(load_model, model_dir)
    assert "model.layers.0.self_attn.k_proj.weight has shape (32, 63), expected (32, 64)" in message
    assert "do not belong together" in message


def test_corrupt_file(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"this is not a safetensors file" * 100)
    message = load_error(load_model, model_dir)
    assert "model.safetensors is corrupt or truncated" in message and "download it again" in message


def test_truncated_file(model_dir):
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])          # an interrupted download
    message = load_error(load_model, model_dir)
    assert "model.safetensors is corrupt or truncated" in message and "download it again" in message


def test_missing_untied_head(model_dir):
    rewrite_weights(model_dir, lambda t: t.pop("lm_head.weight"))
    message = load_error(load_model, model_dir)
    assert "no lm_head.weight" in message and "tie_word_embeddings: false" in message


def test_no_weights(model_dir):
    (model_dir / "model.safetensors").unlink()
    assert "no .safetensors weights" in load_error(load_model, model_dir)


# ----------------------------------------------------------------------------------------------
# Sharded checkpoints
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def sharded(tiny_hf, tmp_path):
    ref, _ = tiny_hf("llama", tie_word_embeddings=False)
    folder = tmp_path / "sharded"
    ref.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 2
    return ref, folder


def test_sharded_checkpoint_loads(sharded):
    ref, folder = sharded
    idx = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = load_model(folder)(idx)
        assert_close(logits, ref(idx).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_bfloat16_file_loads_in_either_dtype(model_dir, dtype):
    """Read as stored (views of the file) or converted tensor by tensor: the file's numbers."""
    path = model_dir / "model.safetensors"
    stored = {k: v.bfloat16() for k, v in load_file(path).items()}
    save_file(stored, path, metadata={"format": "pt"})
    state = load_model(model_dir, dtype).state_dict()
    for ours, theirs in (("tok_emb.weight", "model.embed_tokens.weight"), ("lm_head.weight", "lm_head.weight"),
                         ("layers.1.mlp.up.weight", "model.layers.1.mlp.up_proj.weight")):
        assert state[ours].dtype == dtype and torch.equal(state[ours], stored[theirs].to(dtype)), ours


def test_missing_shard(sharded):
    _, folder = sharded
    shard = sorted(folder.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    message = load_error(load_model, folder)
    assert f"{shard.name} is named in model.safetensors.index.json but missing" in message


# ----------------------------------------------------------------------------------------------
# Longer than the context
# ----------------------------------------------------------------------------------------------

def test_prompt_longer_than_context(model_dir):
    model = load_model(model_dir)                       # max_position_embeddings: 64
    with pytest.raises(ValueError, match="65 tokens exceed the model's context of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="65 tokens exceed the model's context of 64.*shorter prompt"):
        model.new_cache(1, 65)


def test_cached_decoding_past_the_context(model_dir):
    model = load_model(model_dir)
    cache = model.new_cache(1, 64)
    model(torch.zeros(1, 60, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="65 tokens exceed the model's context of 64"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_cached_decoding_past_the_cache(model_dir):
    model = load_model(model_dir)
    cache = model.new_cache(1, 8)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="KV cache full: 6 \\+ 3 tokens > its 8 slots"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_a_gpu_this_machine_lacks_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    load_weights.check_device("cpu")
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"--device={device} but no CUDA GPU is visible: use --device=cpu"):
            load_weights.check_device(device)
