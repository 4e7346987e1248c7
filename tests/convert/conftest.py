"""Fixtures shared by the Karlo importer's test modules."""
import pytest


@pytest.fixture(scope="session")
def karlo_dir(tmp_path_factory):
    """A diffusers-layout Karlo directory of tiny random components (safetensors), written with
    diffusers' own `save_pretrained` from the components of test_karlo_pipeline.py."""
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    from tests.convert import karlo_tiny
    from tests.convert import test_karlo_pipeline as tiny

    root = tmp_path_factory.mktemp("karlo")
    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    tokenizer = tiny._tokenizer(tok_dir)
    tokenizer.save_pretrained(str(tok_dir))
    prior, _, _ = karlo_tiny.random_prior(10, tiny.PRIOR)
    models = {
        "prior": prior, "text_encoder": tiny._text_encoder(tokenizer),
        "decoder": karlo_tiny.randomise(UNet2DConditionModel(**tiny.DECODER_TINY), seed=11),
        "text_proj": karlo_tiny.randomise(UnCLIPTextProjModel(**karlo_tiny.TEXT_PROJ), seed=12),
        "super_res_first": karlo_tiny.randomise(UNet2DModel(**tiny.SUPER_RES_TINY), seed=13),
        "super_res_last": karlo_tiny.randomise(UNet2DModel(**tiny.SUPER_RES_TINY), seed=14)}
    for name, model in models.items():
        model.save_pretrained(str(root / name), safe_serialization=True)
    return str(root)
