import gc
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.hookimpl(wrapper=True)
def pytest_collection(session):
    """No cyclic garbage collection while the test modules import torch, lightning and transformers; what they
    leave is then frozen out of the collector's walks, as in train.py (8-9% of `make test-fast`'s CPU, measured)."""
    gc.disable()
    try:
        return (yield)
    finally:
        gc.freeze()
        gc.enable()


@pytest.fixture(autouse=True)
def _torch_threads():
    """Each test leaves torch's thread count as it found it: a benchmark's code run in this process sets its own
    (`torch.set_num_threads(args.threads)`), and a later in-process run on another count rounds differently from the
    same run in a subprocess (a bit-exact resume compares the two: it failed after such a test, on one worker)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128}


@pytest.fixture(scope="session")
def task_tokenizer_path(tmp_path_factory) -> str:
    from datamodules.task import ReviewTask

    return ReviewTask(num_train=50, num_val=10, cache_dir=str(tmp_path_factory.mktemp("tok"))).tokenizer()


@pytest.fixture(scope="session")
def tokenizer(task_tokenizer_path):
    from modules.backbone import load_tokenizer

    return load_tokenizer(task_tokenizer_path)


@pytest.fixture
def tiny_spec():
    from modules.backbone import BackboneSpec

    return BackboneSpec(config=dict(TINY))


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny random-weight causal LM exported like the SFT stage does."""
    from modules.backbone import BackboneSpec, build_causal_lm
    from modules.export import save_pretrained

    path = str(tmp_path_factory.mktemp("sft") / "sft")
    save_pretrained(build_causal_lm(BackboneSpec(config=dict(TINY)), tokenizer), tokenizer, path)
    return path


def _untrained_export(stage, sft_dir: str, path: str) -> str:
    """A stage module (`RewardModule`, `PreferenceModule`) on the tiny SFT model, exported untrained."""
    from modules.backbone import BackboneSpec

    module = stage(BackboneSpec(pretrained=sft_dir), sft_dir)
    module.configure_model()
    module.export(path)
    return path


@pytest.fixture(scope="session")
def reward_dir(sft_dir, tmp_path_factory) -> str:
    """An untrained reward-stage export of the tiny SFT model (a fresh head; no calibration stats)."""
    from modules.reward_model import RewardModule

    return _untrained_export(RewardModule, sft_dir, str(tmp_path_factory.mktemp("rm") / "reward"))


@pytest.fixture(scope="session")
def preference_dir(sft_dir, tmp_path_factory) -> str:
    """An untrained pairwise preference-model export of the tiny SFT model (a fresh head)."""
    from modules.preference_model import PreferenceModule

    return _untrained_export(PreferenceModule, sft_dir, str(tmp_path_factory.mktemp("pm") / "preference"))
