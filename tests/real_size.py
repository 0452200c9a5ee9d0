"""Real-architecture worlds with random weights, written in the layouts the real configs read: a MIMIC-CXR-JPG-shaped
tree, an SD 1.x diffusers folder, a ResNet-18 posture file, a DenseNet-121 classifier file with operating points,
open_clip folders, an OPT causal-LM folder. Used by tests/test_real_size.py; `python tests/real_size.py DIR` writes
them for a manual run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import open_clip
import torch
import torchxrayvision as xrv
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

from radrl.models.classifier import DENSENET121, DiagnosticClassifier, save_classifier, save_operating_points
from radrl.models.clip import REAL_CONFIGS
from radrl.models.diffusion import random_diffusion
from radrl.models.posture import PostureRegressor
from radrl.models.tokenizer import BOS_ID, EOS_ID, PAD_ID
from radrl.models.weights import embedded_path, save_state

sys.path.insert(0, str(Path(__file__).parent))
from test_image_datasets import FakeStudy, write_mimic_tree  # noqa: E402

IMPRESSIONS = ("No acute cardiopulmonary process.", "Small left pleural effusion.", "Mild cardiomegaly.",
               "Right lower lobe pneumonia.", "Mild pulmonary edema.", "Left basilar atelectasis.")


def write_mimic(root: Path, train: int = 12, test: int = 4) -> Path:
    """A MIMIC-CXR-JPG-shaped tree (metadata and split CSVs, reports, JPEGs) with real-looking impressions."""
    studies = [FakeStudy(f"1{i % 3}00{i:04d}", f"5{i:07d}", "train" if i < train else "test",
                         ((f"pa{i:03d}", "PA"),), IMPRESSIONS[i % len(IMPRESSIONS)] + ("" if i < train else
                                                                                       f" Follow-up {i}."))
               for i in range(train + test)]  # test texts of their own: held-out means unseen
    write_mimic_tree(root, studies)
    return root


def write_open_clip(folder: Path, arch: str) -> Path:
    """An open_clip model folder (open_clip_config.json + open_clip_model.safetensors) of a real architecture."""
    folder.mkdir(parents=True, exist_ok=True)
    # the text tower reads the embedded report tokenizer (its ids fit the tower's vocabulary; the released models'
    # tokenizers come from the hub)
    model_cfg = {**REAL_CONFIGS[arch], "text_cfg": {**REAL_CONFIGS[arch]["text_cfg"],
                                                    "hf_tokenizer_name": str(embedded_path("tokenizer"))}}
    config = {"model_cfg": model_cfg,
              "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(str(embedded_path("tokenizer"))).save_pretrained(str(folder))  # a local-dir reads its own
    model = open_clip.CLIP(**REAL_CONFIGS[arch])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder


def write_bert_folder(folder: Path, words: tuple[str, ...] = (), base: bool = True) -> Path:
    """A Bio_ClinicalBERT-shaped folder (BertConfig of BERT-base, WordPiece tokenizer over a small vocabulary): what
    models.clip.text_model names for a CXR-CLIP release."""
    from transformers import BertConfig, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + sorted(
        {w for text in IMPRESSIONS for w in text.lower().replace(".", " ").split()} | set(words))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(str(folder))
    config = BertConfig(vocab_size=28996) if base else BertConfig(vocab_size=len(vocab), hidden_size=64,
                                                                  num_hidden_layers=2, num_attention_heads=2,
                                                                  intermediate_size=128)
    config.save_pretrained(folder)
    return folder


def write_cxr_clip_release(path: Path, bert_folder: Path, seed: int = 0) -> Path:
    """A random checkpoint in the released CXR-CLIP layout (kakaobrain/cxr-clip's r50_mc.tar): {"model": state dict
    with image_encoder.resnet.* (ResNet-50 without fc), text_encoder.text_encoder.* (BertModel with pooler),
    image_projection.projection.*, text_projection.projection.*, logit_scale; "config": its training config}."""
    from torchvision.models import resnet50
    from transformers import AutoConfig, BertModel

    torch.manual_seed(seed)
    resnet = resnet50(weights=None)
    del resnet.fc
    bert = BertModel(AutoConfig.from_pretrained(str(bert_folder)))
    state = {f"image_encoder.resnet.{k}": v for k, v in resnet.state_dict().items()}
    state |= {f"text_encoder.text_encoder.{k}": v for k, v in bert.state_dict().items()}
    for side, width in (("image", 2048), ("text", bert.config.hidden_size)):
        head = torch.nn.Linear(width, 512)
        state |= {f"{side}_projection.projection.{k}": v for k, v in head.state_dict().items()}
    state["logit_scale"] = torch.tensor(np.log(1 / 0.07))
    config = {"base": {"image_size": 224, "text_max_length": 256},
              "model": {"name": "clip_custom", "temperature": 0.07,
                        "image_encoder": {"source": "torchvision", "name": "resnet", "pretrained": True},
                        "text_encoder": {"source": "huggingface", "name": "emilyalsentzer/Bio_ClinicalBERT",
                                         "pooling": "eos"},
                        "projection_head": {"name": "linear", "dropout": 0.1, "proj_dim": 512}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "config": config}, path)
    return path


def write_cxrl_world(root: Path) -> list[str]:
    """Every file cxrl_roentgen_mimic.yaml reads, at real architecture sizes; returns the --set overrides."""
    root.mkdir(parents=True, exist_ok=True)
    mimic = write_mimic(root / "mimic-cxr-jpg")
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_path("tokenizer")))
    torch.manual_seed(0)
    models = random_diffusion("sd1", 512, tokenizer)
    # RoentGen's release is a whole diffusers pipeline folder (model_index.json beside the SD 1.x subfolders)
    StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                            unet=models.unet, scheduler=models.scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(root / "roentgen")
    save_state(PostureRegressor("resnet18"), root / "posture_resnet18.safetensors")
    classifier = DiagnosticClassifier(xrv.models.DenseNet(**DENSENET121), tuple(xrv.datasets.default_pathologies),
                                      224)
    save_classifier(classifier, root / "densenet121.safetensors")
    thresholds = np.linspace(0.002, 0.2, len(classifier.targets))  # xrv-like operating points, far from 0.5
    save_operating_points(classifier, thresholds, root / "densenet121.safetensors")
    bert = write_bert_folder(root / "Bio_ClinicalBERT")
    write_cxr_clip_release(root / "cxr-clip" / "r50_mc.tar", bert)
    return [f"data.mimic_root={mimic}", f"data.mimic_reports_root={mimic}", f"models.diffusion.weights={root / 'roentgen'}",
            f"models.posture.weights={root / 'posture_resnet18.safetensors'}",
            f"models.classifier.weights={root / 'densenet121.safetensors'}",
            f"models.clip.weights={root / 'cxr-clip' / 'r50_mc.tar'}", f"models.clip.text_model={bert}"]


def opt_config(name: str, vocab_size: int) -> OPTConfig:
    """OPT family members by their published sizes."""
    sizes = {"opt-125m": (768, 12, 12, 3072), "opt-350m": (1024, 24, 16, 4096), "opt-1.3b": (2048, 24, 32, 8192),
             "opt-2.7b": (2560, 32, 32, 10240)}
    hidden, layers, heads, ffn = sizes[name]
    return OPTConfig(vocab_size=vocab_size, hidden_size=hidden, word_embed_proj_dim=512 if name == "opt-350m" else hidden,
                     ffn_dim=ffn, num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=2048,
                     do_layer_norm_before=name != "opt-350m", pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                     eos_token_id=EOS_ID)


def write_rrg_world(root: Path, decoder: str = "opt-1.3b") -> list[str]:
    """Every file rrg_mimic.yaml reads (RadCliQ on its offline backends), at real sizes; returns the overrides."""
    root.mkdir(parents=True, exist_ok=True)
    mimic = write_mimic(root / "mimic-cxr-jpg")
    write_open_clip(root / "biomedclip", "biomedclip")
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_path("tokenizer")))
    torch.manual_seed(0)
    model = OPTForCausalLM(opt_config(decoder, 50272))
    model.save_pretrained(root / decoder)
    tokenizer.save_pretrained(str(root / decoder))
    return [f"data.mimic_root={mimic}", f"data.mimic_reports_root={mimic}", f"models.clip.weights={root / 'biomedclip'}",
            f"models.report_generator.decoder_weights={root / decoder}", "rewards.radcliq_backends=offline"]


if __name__ == "__main__":
    out = Path(sys.argv[1])
    print(" ".join(f"--set {o}" for o in write_cxrl_world(out / "cxrl")))
    print(" ".join(f"--set {o}" for o in write_rrg_world(out / "rrg")))
