"""Packaging stays consistent, and install.py never touches what the host pins."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _install_module():
    spec = importlib.util.spec_from_file_location("sdtune_install", ROOT / "install.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_requirements_txt_and_pyproject_list_the_same_dependencies():
    install = _install_module()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert install.read_requirements() == deps


def test_pyproject_has_the_comfy_registry_block():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = data["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "sdtune"
    assert "web" not in comfy  # WEB_DIRECTORY alone declares it (twice would load the JS twice)
    assert "Repository" in data["project"]["urls"]


@pytest.mark.compat
def test_install_is_a_no_op_when_satisfied():
    install = _install_module()
    to_install, warnings = install.plan(install.read_requirements(), install.installed_versions())
    assert to_install == [] and warnings == []
    out = subprocess.run([sys.executable, str(ROOT / "install.py")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""


def test_only_missing_packages_are_installed_and_old_ones_only_reported():
    install = _install_module()
    installed = {"torch": "2.1.2+cu121", "transformers": "4.30.2", "numpy": "1.26.2", "diffusers": "0.25.0"}
    reqs = ["torch>=2.3", "transformers>=4.30.2", "diffusers>=0.29.1", "numpy>=1.24", "pyyaml>=6.0"]
    to_install, warnings = install.plan(reqs, installed)
    assert to_install == ["pyyaml>=6.0"]
    assert len(warnings) == 2
    assert any("torch>=2.3" in w and "2.1.2+cu121 is installed" in w for w in warnings)
    assert any("diffusers>=0.29.1" in w and "0.25.0" in w for w in warnings)


def test_constraints_pin_everything_installed_and_add_the_measured_caps():
    install = _install_module()
    a1111 = {"torch": "2.1.2+cu121", "gradio": "3.41.2", "transformers": "4.30.2"}
    pins = install.constraints(a1111).split()
    assert pins[:3] == ["gradio==3.41.2", "torch==2.1.2+cu121", "transformers==4.30.2"]
    assert "diffusers<0.32" in pins and "diffusers<0.37" in pins
    forge = {"transformers": "4.46.1", "peft": "0.13.2", "diffusers": "0.31.0"}
    assert {"diffusers<0.34", "diffusers<0.35", "diffusers<0.37"} <= set(install.constraints(forge).split())
    newest = {"transformers": "5.23.0", "peft": "0.21.2"}
    assert [p for p in install.constraints(newest).split() if "<" in p] == []


def test_install_runs_pip_through_a1111_launch_with_the_constraints(tmp_path):
    """With A1111's `launch` module present, install.py uses launch.run_pip and passes the pins."""
    (tmp_path / "launch.py").write_text(
        "import json, sys\n"
        "def run_pip(args, desc):\n"
        "    cons = args.split(' -c ')[1].strip(\"'\")\n"
        "    print(json.dumps({'args': args, 'desc': desc, 'constraints': open(cons).read()}))\n")
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import importlib.util as u\n"
            f"s = u.spec_from_file_location('inst', {str(ROOT / 'install.py')!r}); m = u.module_from_spec(s)\n"
            "s.loader.exec_module(m)\n"
            "m.read_requirements = lambda: ['sdtune-not-a-real-package>=1', 'torch>=0.1']\n"
            "m.main()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    call = json.loads(out.stdout.strip().splitlines()[0])
    assert call["args"].split(" -c ")[0] in ("install sdtune-not-a-real-package>=1",
                                              "install 'sdtune-not-a-real-package>=1'")
    assert f"torch=={torch_version()}" in call["constraints"].split()


def torch_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("torch")


@pytest.mark.compat
def test_importing_the_pack_root_pulls_in_neither_gradio_nor_comfy():
    code = ("import importlib.util, sys\n"
            f"s = importlib.util.spec_from_file_location('sdtune_pack', {str(ROOT / '__init__.py')!r},"
            f" submodule_search_locations=[{str(ROOT)!r}])\n"
            "m = importlib.util.module_from_spec(s); sys.modules['sdtune_pack'] = m; s.loader.exec_module(m)\n"
            "import lib_sdtune.models.inspect, lib_sdtune.cli\n"
            "bad = [n for n in sys.modules if n.split('.')[0] in ('gradio', 'comfy', 'comfy_api', 'torchvision',"
            " 'open_clip', 'timm', 'modules')]\n"
            "assert m.WEB_DIRECTORY and callable(m.comfy_entrypoint), 'entry missing'\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_gpu_build_of_onnxruntime_satisfies_the_onnxruntime_requirement():
    """Installing plain onnxruntime beside onnxruntime-gpu would silently take CUDA away from the host."""
    install = _install_module()
    to_install, _ = install.plan(["onnxruntime>=1.17"], {"onnxruntime-gpu": "1.19.2"})
    assert to_install == []
    to_install, _ = install.plan(["onnxruntime>=1.17"], {})
    assert to_install == ["onnxruntime>=1.17"]
