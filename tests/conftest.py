from pathlib import Path

import pytest
import torch

from dropup.config import ModelConfig, MoEConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture
def gqa_model() -> ModelConfig:
    """A tiny Llama with grouped-query attention (2 query heads per KV head) and a non-default rope theta."""
    return ModelConfig(name="t", vocab_size=97, n_layers=2, d_model=32, d_ff=64, n_heads=4, n_kv_heads=2, rope_theta=500.0)


@pytest.fixture
def moe8() -> MoEConfig:
    return MoEConfig(enabled=True, num_experts=8, top_k=2)


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """Prepared data and seed models shared by every test (each is built once, like in real use)."""
    root = tmp_path_factory.mktemp("store")
    return [f"paths.data_dir={root / 'data'}", f"paths.seed_store={root / 'seeds'}"]


def run_py_inline(*args: str) -> tuple[int, str, str]:
    """`python run.py <args>` as Hydra's own entry point runs it (its composition, error reporting and exit code),
    in this process: (exit code, stdout, stderr). For the CLI's contracts where a new interpreter's imports would
    cost more than the check; the subprocess tests keep the real process boundary."""
    import contextlib
    import io
    import logging
    import sys

    import hydra
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    sys.path.insert(0, str(ROOT))
    import run  # noqa: F401  (registers the schema)

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv = sys.argv
    sys.argv = ["run.py", *args]
    try:
        # run.py's own function under Hydra's main, with the config directory given absolutely (Hydra resolves
        # a relative one against the module, which is not a package here)
        entry = hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="config")(run.main.__wrapped__)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            entry()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
        if not isinstance(exit_.code, int) and exit_.code is not None:
            err.write(f"{exit_.code}\n")  # what the interpreter prints for SystemExit("message")
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
    return code, out.getvalue(), err.getvalue()
