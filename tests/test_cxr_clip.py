"""The released CXR-CLIP layout (ResNet-50 + BERT, kakaobrain/cxr-clip) as the consistency reward: loaded from a
random checkpoint of that layout, its embeddings are the ones the release's own definition gives."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import resnet50
from transformers import AutoConfig, AutoTokenizer, BertModel

from radrl.config import load_config
from radrl.models.clip import build_clip
from radrl.models.weights import MissingWeightsError
from radrl.reward_actors.rewards import build_reward

from real_size import write_bert_folder, write_cxr_clip_release

REPORTS = ["Small left pleural effusion.", "No acute cardiopulmonary process."]


def test_a_cxr_clip_release_loads_as_the_consistency_reward_and_embeds_as_the_release_defines(tmp_path):
    bert_folder = write_bert_folder(tmp_path / "bert", base=False)
    release = write_cxr_clip_release(tmp_path / "r50_mc.tar", bert_folder)
    cfg = load_config(None, [f"models.clip.weights={release}", "models.clip.arch=cxr_clip",
                             f"models.clip.text_model={bert_folder}"])
    clip = build_clip(cfg.models.clip)
    images = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image_embeddings, text_embeddings = clip.encode_images(images), clip.encode_reports(REPORTS)

    # the release's definition, from its state dict: ResNet-50 pooled features at 224 px on ImageNet-normalised RGB,
    # BERT's hidden state at the last attended token, linear heads, L2 norm
    state = torch.load(release, weights_only=False)["model"]
    resnet = resnet50(weights=None)
    del resnet.fc
    resnet.load_state_dict({k.removeprefix("image_encoder.resnet."): v for k, v in state.items()
                            if k.startswith("image_encoder.resnet.")})
    resnet.fc = torch.nn.Identity()
    bert = BertModel(AutoConfig.from_pretrained(str(bert_folder)))
    bert.load_state_dict({k.removeprefix("text_encoder.text_encoder."): v for k, v in state.items()
                          if k.startswith("text_encoder.text_encoder.")})
    resnet.eval(), bert.eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    rgb = (F.interpolate(images, size=224, mode="bilinear", antialias=True).repeat(1, 3, 1, 1) - mean) / std
    tokens = AutoTokenizer.from_pretrained(str(bert_folder))(REPORTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = resnet(rgb)
        hidden = bert(**tokens).last_hidden_state
    last = tokens["attention_mask"].sum(dim=1) - 1
    assert (tokens["input_ids"][torch.arange(2), last] == 3).all()  # the last attended token is [SEP]
    expected_images = F.normalize(pooled @ state["image_projection.projection.weight"].T
                                  + state["image_projection.projection.bias"], dim=-1)
    expected_texts = F.normalize(hidden[torch.arange(2), last] @ state["text_projection.projection.weight"].T
                                 + state["text_projection.projection.bias"], dim=-1)
    torch.testing.assert_close(image_embeddings, expected_images, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(text_embeddings, expected_texts, atol=1e-5, rtol=1e-4)

    reward = build_reward("consist", cfg.models)  # what the reward actors build from the config
    scores, _ = reward(images, REPORTS)
    torch.testing.assert_close(torch.as_tensor(scores, dtype=torch.float32),
                               (expected_images * expected_texts).sum(dim=-1), atol=1e-5, rtol=0)


def test_a_release_without_its_bert_or_of_another_layout_is_refused_clearly(tmp_path):
    bert_folder = write_bert_folder(tmp_path / "bert", base=False)
    release = write_cxr_clip_release(tmp_path / "r50_mc.tar", bert_folder)
    no_text = load_config(None, [f"models.clip.weights={release}", "models.clip.arch=cxr_clip"])
    with pytest.raises(MissingWeightsError, match="text_model is not set"):
        build_clip(no_text.models.clip)
    other = tmp_path / "other.tar"
    torch.save({"model": {"visual.conv1.weight": torch.zeros(1)}, "config": {}}, other)
    wrong = load_config(None, [f"models.clip.weights={other}", "models.clip.arch=cxr_clip",
                               f"models.clip.text_model={bert_folder}"])
    with pytest.raises(MissingWeightsError, match="not a CXR-CLIP ResNet-50 checkpoint"):
        build_clip(wrong.models.clip)
