import pytest
import torch
import torch.nn.functional as F

from encoders import Vocabulary, VocabularyError, create_encoder, label_embeddings, load_vocabulary, top_tags
from encoders.text import calibrate


@pytest.fixture(scope="module")
def encoder():
    return create_encoder("tiny_clip", words=("red circle blue square running",))


def test_txt_vocabulary(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("# actions\nrunning\n\nswimming  # in water\n")
    assert load_vocabulary(path) == Vocabulary(("running", "swimming"))
    path.write_text("running\nswimming\nrunning\n")
    with pytest.raises(VocabularyError, match=r"v.txt:3: label 'running' repeats line 1"):
        load_vocabulary(path)
    path.write_text("# nothing\n")
    with pytest.raises(VocabularyError, match="no labels"):
        load_vocabulary(path)


def test_yaml_vocabulary_with_synonyms_and_parents(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("- label: opening a car door\n  synonyms: [getting into a car]\n  parent: vehicles\n"
                    "- riding a bike\n")
    vocab = load_vocabulary(path)
    assert vocab.labels == ("opening a car door", "riding a bike")
    assert vocab.phrasings("opening a car door") == ("opening a car door", "getting into a car")
    assert vocab.parents == {"opening a car door": "vehicles"}
    path.write_text("- label: a\n- label: b\n  synonym: [c]\n")
    with pytest.raises(VocabularyError, match=r"v.yaml:2: unknown key 'synonym'"):
        load_vocabulary(path)
    path.write_text("- label: a\n- parent: x\n")
    with pytest.raises(VocabularyError, match=r"v.yaml:2: each entry needs a 'label'"):
        load_vocabulary(path)
    path.write_text("- a\n- b\n- label: a\n")
    with pytest.raises(VocabularyError, match=r"v.yaml:3: label 'a' repeats line 1"):
        load_vocabulary(path)


def test_prompt_ensemble_is_the_normalised_mean_over_templates_and_phrasings(encoder):
    vocab = Vocabulary(("red circle", "blue square"), synonyms={"blue square": ("square",)})
    templates = ("a {}.", "a video of a {}.")
    emb = label_embeddings(encoder, vocab, templates)

    def unit(text):
        return F.normalize(encoder.encode_text([text]), dim=-1)[0]

    red = F.normalize(unit("a red circle.") + unit("a video of a red circle."), dim=0)
    blue = F.normalize(sum(unit(t.format(p)) for t in templates for p in ("blue square", "square")), dim=0)
    assert torch.allclose(emb[0], red, atol=1e-5) and torch.allclose(emb[1], blue, atol=1e-5)
    assert label_embeddings(encoder, vocab, templates) is emb  # cached


def test_a_checkpoint_rewritten_in_place_gets_its_own_label_embeddings(tmp_path):
    """The cache belongs to the loaded model, not to its path: a model retrained in place and loaded again in
    the same process must not be scored against the old model's label embeddings."""
    from encoders._tiny import save_tiny

    vocab, templates = Vocabulary(("red circle", "blue square")), ("a {}.",)
    words = ("red circle blue square",)
    load = lambda: create_encoder("clip", pretrained=str(tmp_path), local_files_only=True,  # noqa: E731
                                  dtype="float32", device="cpu")
    save_tiny(tmp_path, seed=0, words=words)
    old = label_embeddings(load(), vocab, templates)
    save_tiny(tmp_path, seed=1, words=words)  # same path, other weights
    new = label_embeddings(load(), vocab, templates)
    assert not torch.allclose(old, new)


def test_calibrated_confidence_is_per_label_standardised():
    torch.manual_seed(0)
    labels = F.normalize(torch.randn(3, 8), dim=-1)
    reference = F.normalize(torch.randn(64, 8), dim=-1)
    cal = calibrate(reference, labels)
    cos = reference @ labels.T
    assert torch.allclose(cal.mean, cos.mean(0)) and torch.allclose(cal.std, cos.std(0))
    at_3_sigma = cal.mean + 3 * cal.std
    assert torch.allclose(cal(at_3_sigma[None]), torch.full((1, 3), 0.5))  # the same meaning for every label
    assert (cal(at_3_sigma[None] + 0.1) > 0.5).all() and (cal(cal.mean[None]) < 0.1).all()


def test_top_tags_are_sorted_with_scores_and_confidences():
    probs = torch.tensor([[0.1, 0.7, 0.2]])
    conf = torch.tensor([[0.9, 0.3, 0.5]])
    tags = top_tags(probs, ("a", "b", "c"), 2, conf)
    assert [(t["label"], round(t["score"], 3), round(t["confidence"], 3)) for t in tags[0]] == [
        ("b", 0.7, 0.3), ("c", 0.2, 0.5)]
