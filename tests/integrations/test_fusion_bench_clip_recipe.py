"""The paper's setting as a FusionBench recipe: ``ParetoMergingCLIPAlgorithm`` (AdaMerging + PM on unlabeled
test inputs with FusionBench's zero-shot CLIP heads), ``method/pareto_merging_clip.yaml`` and the top-level
``pareto_merging_clip_vit_b32_ta8.yaml`` over FusionBench's own TA8 pools.

Offline and CPU-only: the recipe is composed (never run: its models and datasets are on the hub), and the
algorithm runs end to end on tiny stand-ins built here: a random 2-layer CLIP (pretrained) and perturbed
CLIPVisionModel copies (fine-tuned) in local directories, a character-level CLIP tokenizer, and tiny image
datasets saved with ``datasets.save_to_disk``, for three of FusionBench's own task names (their class names and
prompt templates are FusionBench's, read from the package). Nothing is monkeypatched but FusionBench's joblib
cache directory (into tmp)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from helpers import run_offline

fusion_bench = pytest.importorskip("fusion_bench", reason="fusion-bench is not installed: pip install "
                                                          "'pmkernels[fusionbench]' (fusion-bench==0.2.33)")
transformers = pytest.importorskip("transformers")
from hydra import compose, initialize_config_module  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import paretomerge as pm  # noqa: E402
import paretomerge.integrations.fusion_bench_config as our_configs  # noqa: E402
from paretomerge.integrations.fusion_bench import ParetoMergingCLIPAlgorithm, pool_from_fusion_bench  # noqa: E402,E501

OURS = Path(our_configs.__path__[0])
RECIPE = "pareto_merging_clip_vit_b32_ta8"
TA8 = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
TASKS = ["mnist", "svhn", "eurosat"]  # FusionBench task names with short class names (10 classes each)
FAST = {"progress": False, "impl": "torch", "objective_impl": "torch"}


def _compose_recipe(overrides=()):
    # As the CLI (--config-dir <ours> --config-name <recipe>) does: our package's configs first (pkg://
    # paretomerge.integrations.fusion_bench_config), then FusionBench's shipped config directory.
    import fusion_bench_config  # FusionBench's configs: a namespace package beside fusion_bench in its wheel

    fb_dir = Path(list(fusion_bench_config.__path__)[0])
    with initialize_config_module(config_module="paretomerge.integrations.fusion_bench_config", version_base=None):
        return compose(config_name=RECIPE, overrides=[f"hydra.searchpath=[file://{fb_dir}]", *overrides])


def test_recipe_composes_offline_with_fusion_bench_pools(no_network):
    cfg = _compose_recipe()
    assert cfg._target_ == "fusion_bench.programs.FabricModelFusionProgram"  # FusionBench's own program
    assert cfg.modelpool._target_ == "fusion_bench.modelpool.CLIPVisionModelPool"
    assert list(cfg.modelpool.models) == ["_pretrained_", *TA8]
    assert cfg.modelpool.models._pretrained_ == "openai/clip-vit-base-patch32"
    assert list(cfg.modelpool.test_datasets) == TA8  # the unlabeled inputs
    assert cfg.taskpool._target_ == "fusion_bench.taskpool.CLIPVisionModelTaskPool"
    assert list(cfg.taskpool.test_datasets) == TA8
    m = cfg.method
    assert m._target_ == "paretomerge.integrations.fusion_bench.ParetoMergingCLIPAlgorithm"
    assert (m.mode, m.include, m.rank, m.steps, m.batch_size) == ("unlabeled", "qkv", 16, 2000, 16)
    assert m.trainer_options.adamerging == "auto" and m.trainer_options.adamerging_steps == 1000
    # the pools are FusionBench's files, not copies of them
    assert not (OURS / "modelpool" / "CLIPVisionModelPool").exists() and not (OURS / "taskpool").exists()

    algo = instantiate(cfg.method)  # no model is loaded
    assert isinstance(algo, ParetoMergingCLIPAlgorithm)
    t = algo._trainer_cfg
    assert (t.mode, t.adamerging, t.adamerging_steps, t.adamerging_lr, t.rank, t.include, t.steps, t.batch_size) == \
        ("unlabeled", "auto", 1000, 1e-3, 16, "qkv", 2000, 16)
    assert algo.unlabeled_batches == 32
    # FusionBench's program builds the task pool after the method: under transformers 5 its CLIP task pool
    # imports only with clip_task_pool_compat (which the method applied); building it loads nothing
    taskpool = instantiate(cfg.taskpool)
    assert type(taskpool).__name__ == "CLIPVisionModelTaskPool" and list(taskpool._test_datasets) == TA8

    over = _compose_recipe(["method.mode=datafree", "method.steps=5"]).method
    assert instantiate(over)._trainer_cfg.mode == "datafree"


def test_recipe_command_resolves_offline(tmp_path):
    """The documented command, with --cfg job (print the composed config, run nothing)."""
    res = run_offline([sys.executable, "-m", "fusion_bench.scripts.cli", "--config-dir", str(OURS),
                       "--config-name", RECIPE, "--cfg", "job"], cwd=tmp_path, timeout=120)
    cfg = OmegaConf.create(res.stdout)
    assert cfg.method._target_.endswith("ParetoMergingCLIPAlgorithm")
    assert list(cfg.modelpool.test_datasets) == TA8


def test_bad_options_name_themselves():
    with pytest.raises(ValueError, match="trainer.mode"):
        ParetoMergingCLIPAlgorithm(mode="labeled")
    with pytest.raises(ValueError, match="unlabeled_batches"):
        ParetoMergingCLIPAlgorithm(unlabeled_batches=0)
    with pytest.raises(ValueError, match="num_workers"):
        ParetoMergingCLIPAlgorithm(num_workers=-1)
    with pytest.raises(ValueError, match="trainer.batch_size"):
        ParetoMergingCLIPAlgorithm(batch_size=0)
    with pytest.raises(ValueError, match="trainer_options.batch_size"):
        ParetoMergingCLIPAlgorithm(trainer_options={"batch_size": 8})
    with pytest.raises(ValueError, match="trainer.adamerging"):
        ParetoMergingCLIPAlgorithm(trainer_options={"adamerging": "after"})


# --------------------------------------------------------------------------------------- tiny stand-ins
def _tiny_processor():
    from tokenizers import pre_tokenizers
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    # character-level CLIP BPE: every byte (alone and word-final) is a token, no merges
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}),
                         tokenizer=CLIPTokenizer(vocab=vocab, merges=[]))


def _tiny_dataset(path: Path, n_classes: int, seed: int) -> None:
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(24)]
    labels = [int(x) for x in rng.integers(0, n_classes, 24)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(path))


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    from fusion_bench.tasks.clip_classification import get_num_classes
    from safetensors.torch import load_file, save_file
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    root = tmp_path_factory.mktemp("tiny_clip")
    processor = _tiny_processor()
    tok = processor.tokenizer
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=32, patch_size=8),
                     projection_dim=16)
    torch.manual_seed(0)
    clip = CLIPModel(cfg).eval()
    clip.save_pretrained(root / "pretrained")  # a CLIPModel, as openai/clip-vit-base-patch32
    processor.save_pretrained(root / "pretrained")
    dirs = {"_pretrained_": root / "pretrained"}
    for i, task in enumerate(TASKS):  # fine-tuned CLIPVisionModels, as tanganke/clip-vit-base-patch32_<task>
        vision = CLIPVisionModel(cfg.vision_config)
        vision.load_state_dict(clip.vision_model.state_dict())
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in vision.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        vision.save_pretrained(root / task)
        if i == 0:  # the hub's checkpoints (transformers 4) name the tensors vision_model.*: one stand-in does too
            f = root / task / "model.safetensors"
            save_file({f"vision_model.{k}": v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
        dirs[task] = root / task
        _tiny_dataset(root / f"{task}_test", get_num_classes(task), seed=i)
    return root, dirs


def _clip_pool(root: Path, dirs: dict):
    from fusion_bench.modelpool import CLIPVisionModelPool

    # the shape of FusionBench's TA8 pool config, with local paths (resolve_repo_path keeps existing paths)
    return CLIPVisionModelPool(
        models=OmegaConf.create({k: str(v) for k, v in dirs.items()}),
        processor=str(dirs["_pretrained_"]),
        test_datasets=OmegaConf.create({t: {"_target_": "datasets.load_from_disk",
                                            "dataset_path": str(root / f"{t}_test")} for t in TASKS}))


@pytest.fixture
def joblib_cache_in_tmp(tmp_path, monkeypatch):
    # FusionBench caches zero-shot heads with joblib under ./outputs/cache (the cwd at import): keep it in tmp
    import fusion_bench.utils.cache_utils as cache_utils

    monkeypatch.setattr(cache_utils, "DEFAULT_CACHE_DIR", tmp_path / "cache")


def test_adamerging_plus_pm_on_tiny_clip_stand_ins(clip_dirs, joblib_cache_in_tmp, no_network):
    root, dirs = clip_dirs
    method = OmegaConf.load(OURS / "method" / "pareto_merging_clip.yaml")  # the shipped defaults, made small
    method.merge_with({"rank": 4, "steps": 12, "batch_size": 6, "unlabeled_batches": 2, "num_workers": 0,
                       "returns": "pareto",
                       "trainer_options": {"adamerging_steps": 4, "adamerging_lr": 5e-2, "lr": 5e-2, **FAST}})
    algo = instantiate(method)
    pool = _clip_pool(root, dirs)
    pre = pool.load_model("_pretrained_")
    model = algo.run(pool)

    assert algo.task_names == TASKS and len(algo.history) == 12
    assert set(algo.zeroshot_weights) == set(TASKS)  # the mixin's zero-shot heads, one per task
    assert all(algo.zeroshot_weights[t].shape == (10, 16) for t in TASKS)
    assert algo.get_shuffled_test_loader_iter.cache_info().currsize == len(TASKS)  # one test loader per task
    # λ learned (AdaMerging) and baked: the base is neither the pretrained model nor task arithmetic at λ = 0.3
    layers = dict(pm.pareto_layers(model))
    assert layers and all(n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj") for n in layers)  # include: qkv
    ours = pool_from_fusion_bench(_clip_pool(root, dirs))
    # hub-style vision_model.* files are loaded through transformers, the others read lazily from the files
    assert [type(s).__name__ for s in ours._sources] == ["LoaderSource", "SafetensorsSource", "SafetensorsSource"]
    ta = pm.task_arithmetic(ours, lam=0.3)
    fc1 = "encoder.layers.0.mlp.fc1.weight"  # transformers 5 keys (no vision_model. prefix)
    own = dict(model.named_parameters())[fc1]
    assert not torch.allclose(own, pre.state_dict()[fc1]) and not torch.allclose(own, ta.state_dict()[fc1]), \
        "AdaMerging's λ were not learned"
    # the tensor trained (U starts at 0: ΔW = 0 at the base), and the preference changes the exported weights
    name, layer = next(iter(layers.items()))
    assert float(layer.U.detach().abs().max()) > 0
    a = pm.export(model, [1.0, 0.0, 0.0])
    b = pm.export(model, [0.0, 0.0, 1.0])
    assert type(a).__name__ == "CLIPVisionModel"
    q = f"{name}.weight"
    assert not torch.equal(a.state_dict()[q], b.state_dict()[q]), "the preference does not change the weights"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = a(pixel_values=x).pooler_output
        with pm.use_preference([1 / 3] * 3):
            model(pixel_values=x)
    assert out.shape == (2, 32) and torch.isfinite(out).all()
    with torch.no_grad():
        logits = algo.compute_logits(a, x, "mnist")
    assert logits.shape == (2, 10)


def test_datafree_mode_and_exported_model(clip_dirs, joblib_cache_in_tmp, no_network):
    root, dirs = clip_dirs
    algo = ParetoMergingCLIPAlgorithm(mode="datafree", rank=2, steps=3, include="qkv", preference=[0.5, 0.3, 0.2],
                                      trainer_options=FAST)
    merged = algo.run(_clip_pool(root, dirs))
    assert type(merged).__name__ == "CLIPVisionModel" and not algo.zeroshot_weights  # no heads built
    assert len(algo.history) == 3
    with torch.no_grad():
        assert merged(pixel_values=torch.randn(1, 3, 32, 32)).pooler_output.shape == (1, 32)


def test_unlabeled_mode_needs_the_pools_test_sets(clip_dirs, joblib_cache_in_tmp, no_network):
    from fusion_bench.modelpool import CLIPVisionModelPool

    root, dirs = clip_dirs
    pool = CLIPVisionModelPool(models=OmegaConf.create({k: str(v) for k, v in dirs.items()}),
                               processor=str(dirs["_pretrained_"]))
    with pytest.raises(ValueError, match="test_datasets has no entry for"):
        ParetoMergingCLIPAlgorithm(steps=1, trainer_options=FAST).run(pool)
    with pytest.raises(ValueError, match="CLIPVisionModelPool"):
        ParetoMergingCLIPAlgorithm(steps=1, trainer_options=FAST).run(
            {k: pool.load_model(k) for k in dirs})


def test_fusion_bench_cli_runs_the_method_on_the_stand_ins(clip_dirs, tmp_path):
    """The CLI path of the recipe (FusionBench's program, Fabric, model saving and its CLIP task pool's
    evaluation) with stand-in model and task pool configs in place of TA8's hub ones."""
    root, dirs = clip_dirs
    pre = str(dirs["_pretrained_"])
    test_sets = {t: {"_target_": "datasets.load_from_disk", "dataset_path": str(root / f"{t}_test")} for t in TASKS}
    configs = {"modelpool": {"_target_": "fusion_bench.modelpool.CLIPVisionModelPool", "_recursive_": False,
                             "processor": pre, "models": {k: str(v) for k, v in dirs.items()},
                             "test_datasets": test_sets},
               "taskpool": {"_target_": "fusion_bench.taskpool.CLIPVisionModelTaskPool", "_recursive_": False,
                            "test_datasets": test_sets, "clip_model": pre, "processor": pre,
                            "dataloader_kwargs": {"batch_size": 8, "num_workers": 0, "shuffle": False}}}
    for group, cfg in configs.items():
        (tmp_path / "cfg" / group).mkdir(parents=True)
        OmegaConf.save(OmegaConf.create(cfg), tmp_path / "cfg" / group / "tiny_clip.yaml")
    out, report = tmp_path / "merged", tmp_path / "report.json"
    run_offline([sys.executable, "-m", "fusion_bench.scripts.cli", "--config-dir", str(OURS),
                 f"hydra.searchpath=[file://{tmp_path / 'cfg'}]", "method=pareto_merging_clip",
                 "modelpool=tiny_clip", "taskpool=tiny_clip", "fabric.accelerator=cpu", "print_config=false",
                 f"report_save_path={report}",
                 "method.rank=2", "method.steps=3", "method.batch_size=4", "method.unlabeled_batches=1",
                 "method.num_workers=0", "method.trainer_options.adamerging_steps=2",
                 *[f"+method.trainer_options.{k}={v}" for k, v in FAST.items() if k != "progress"],
                 "method.trainer_options.progress=false", f"merged_model_save_path={out}"],
                cwd=tmp_path, timeout=240)
    import json

    accuracy = {t: json.loads(report.read_text())[t]["accuracy"] for t in TASKS}  # FusionBench's evaluation
    assert all(0.0 <= a <= 1.0 for a in accuracy.values()), accuracy
    merged = transformers.CLIPVisionModel.from_pretrained(out, local_files_only=True)
    with torch.no_grad():
        assert torch.isfinite(merged(pixel_values=torch.randn(1, 3, 32, 32)).pooler_output).all()
    fc1 = "encoder.layers.0.mlp.fc1.weight"  # not a Pareto layer: moved from task arithmetic by AdaMerging's λ only
    ta = pm.task_arithmetic(pool_from_fusion_bench(_clip_pool(root, dirs)), lam=0.3)
    assert not torch.allclose(merged.state_dict()[fc1], ta.state_dict()[fc1])
