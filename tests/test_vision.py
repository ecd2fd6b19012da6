"""Multimodal GPT: images spliced into the token sequence, trained with `gptlab finetune --task vqa`, answered
through the Python API, the CLI, a real `gptlab serve` with the openai client, and the playground."""

from __future__ import annotations

import base64
import io
import json
import random

import openai
import pytest
import torch
from PIL import Image, ImageDraw

from gptlab import checkpoint, cli, loading, prompts
from gptlab.config import ConfigError, TrainConfig
from gptlab.data import DataError
from gptlab.errors import GptlabError
from gptlab.finetune.config import FinetuneConfig, configs_from_sources
from gptlab.finetune.data import load_vqa
from gptlab.finetune.run import finetune
from gptlab.finetune.tasks import eval_task, vqa_task
from gptlab.language_model import LanguageModel
from gptlab.model import GPT, IGNORE_INDEX
from gptlab.prompts import Message
from gptlab.vision import ImageError, VisionConfig, VisionTower, load_image
from gptlab.vision.images import MAX_PIXELS, decode_data_url
from gptlab.vision.pretrain import pretrain_tower
from tests.conftest import run_cli, tiny_model_config
from tests.helpers import ServerProcess
from tests.test_playground import browser  # noqa: F401  (the headless Chromium fixture)

# three images whose answers differ only by what is drawn: the text alone cannot tell them apart
SHAPES = {"yellow": ("circle", (230, 210, 20)), "green": ("rectangle", (30, 180, 30)), "blue": ("triangle", (30, 30, 220))}
COLOR_Q, SHAPE_Q = "what color is the shape?", "what shape is in the image?"


def _draw(shape: str, rgb: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    {"circle": lambda: draw.ellipse((12, 12, 52, 52), fill=rgb),
     "rectangle": lambda: draw.rectangle((10, 18, 54, 46), fill=rgb),
     "triangle": lambda: draw.polygon([(32, 8), (56, 56), (8, 56)], fill=rgb)}[shape]()
    return image


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa-data")
    (root / "images").mkdir()
    records = []
    for color, (shape, rgb) in SHAPES.items():
        _draw(shape, rgb).save(root / "images" / f"{color}.png")
        for question, answer, kind in ((COLOR_Q, color, "color"), (SHAPE_Q, shape, "shape")):
            records.append({"instruction": f"<image>\n{question}", "output": answer,
                            "images": [f"images/{color}.png"], "type": kind,
                            "image_labels": {"color": color, "shape": shape}})
    for split in ("train", "val"):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory, tiny_pretrained, vqa_data, one_torch_thread):
    """The tiny pretrained LM with a small CNN tower, pretrained on the images' labels and then frozen (the
    easy-VQA recipe), fully fine-tuned until it has learnt the six answers (on one torch thread: on a busy 2-core
    machine a second one only spins; accuracy 1.0 from step 100 of 150, from step 125 of 200 without the tower's
    pretraining). The checkpoint is a partial one: it holds the frozen encoder all the same."""
    out = tmp_path_factory.mktemp("vqa-run") / "run"
    cfg, ft = configs_from_sources(None, dict(init=str(tiny_pretrained), data=str(vqa_data), out=str(out),
                                              max_steps=150, batch_size=6, lr=3e-3, warmup_steps=5, eval_interval=150,
                                              ckpt_interval=150, precision="fp32"),
                                   dict(task="vqa", method="full", vision_width=32, image_tokens=4, max_new_tokens=8,
                                        vision_pretrain_steps=40, freeze_vision_encoder=True))
    result = finetune(cfg, ft, log=lambda _: None)
    assert result["accuracy"] == 1.0, result
    return out


@pytest.fixture(scope="module")
def lm(vqa_run, one_torch_thread):
    return LanguageModel.load(vqa_run)


def _prompt(lm: LanguageModel, question: str) -> str:
    return lm.prompt_style.render([Message("user", f"<image>\n{question}")])


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_input_embeddings_seam_equals_the_token_lookup():
    torch.manual_seed(0)
    model = GPT(tiny_model_config()).eval()
    idx = torch.randint(0, 512, (2, 9))
    logits, _ = model(idx)
    same, _ = model(idx, embeds=model.transformer.wte(idx))
    torch.testing.assert_close(same, logits)
    spliced = model.transformer.wte(idx).clone()
    spliced[0, 3] = 0  # an "image" vector changes that row's later positions only
    other, _ = model(idx, embeds=spliced)
    torch.testing.assert_close(other[1], logits[1])
    torch.testing.assert_close(other[0, :3], logits[0, :3])
    assert not torch.allclose(other[0, 3:], logits[0, 3:])


def _random_shape(rng: random.Random) -> tuple[torch.Tensor, int]:
    """Pixels of one of the three shapes at a random place and size, in a random dark colour on a light
    background (easy-VQA's kind of image), and the shape's index."""
    kind, size = rng.randrange(3), rng.randint(14, 36)
    x, y = rng.randint(0, 64 - size), rng.randint(0, 64 - size)
    image = Image.new("RGB", (64, 64), tuple(rng.randint(200, 255) for _ in range(3)))
    draw, fill, box = ImageDraw.Draw(image), tuple(rng.randint(0, 160) for _ in range(3)), (x, y, x + size, y + size)
    (lambda: draw.ellipse(box, fill=fill), lambda: draw.rectangle(box, fill=fill),
     lambda: draw.polygon([(x + size // 2, y), (x + size, y + size), (x, y + size)], fill=fill))[kind]()
    return load_image(_png(image), 64), kind


def test_cnn_tower_features_tell_shapes_apart_wherever_they_are(one_torch_thread):
    """A linear probe on the CNN tower's image vector learns the shape of unseen images in 60 steps. The first
    CNN (average pool to the grid, then a LayerNorm) stayed at 45% (chance: 33%) here, and at chance on
    easy-VQA's shape questions through the GPT."""
    rng = random.Random(0)
    torch.manual_seed(0)
    pixels, kinds = zip(*(_random_shape(rng) for _ in range(300)), strict=True)
    pixels, kinds = torch.stack(pixels), torch.tensor(kinds)
    tower, probe = VisionTower(VisionConfig(width=32, image_tokens=1), n_embd=32), torch.nn.Linear(32, 3)
    optimizer = torch.optim.AdamW([*tower.parameters(), *probe.parameters()], lr=3e-3)
    for _ in range(60):
        batch = torch.randint(200, (32,))
        loss = torch.nn.functional.cross_entropy(probe(tower(pixels[batch])[:, 0]), kinds[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (probe(tower(pixels[200:])[:, 0]).argmax(1) == kinds[200:]).float().mean().item()
    assert accuracy >= 0.9


@pytest.mark.parametrize("encoder", ["cnn", "vit"])
def test_vision_tower_gives_one_embedding_per_image_token(encoder):
    tower = VisionTower(VisionConfig(encoder=encoder, width=32, image_tokens=16), n_embd=48)
    assert tower(torch.rand(3, 3, 64, 64)).shape == (3, 16, 48)


def test_the_trained_model_answers_from_the_image(lm, vqa_data):
    """Same question, different images, different (correct) answers; blank images lose the answers."""
    for color, (shape, _) in SHAPES.items():
        path = vqa_data / "images" / f"{color}.png"
        assert lm.generate(_prompt(lm, COLOR_Q), images=[path], temperature=0, max_new_tokens=8) == [color]
        assert lm.generate(_prompt(lm, SHAPE_Q), images=[path.read_bytes()], temperature=0, max_new_tokens=8) == [shape]
    blank = [lm.generate(_prompt(lm, COLOR_Q), images=[torch.zeros(3, 64, 64)], temperature=0, max_new_tokens=8)[0]]
    assert len(set(blank)) == 1  # one image-less answer, whatever it is


def test_batched_image_decoding_equals_one_by_one_and_streaming(lm, vqa_data):
    prompts, images = [], []
    for color in SHAPES:
        for question in (COLOR_Q, SHAPE_Q):
            prompts.append(_prompt(lm, question))
            images.append([vqa_data / "images" / f"{color}.png"])
    lm.max_batch = 8
    batched = lm.generate(prompts, images=images, temperature=0, max_new_tokens=8)
    alone = [lm.generate(p, images=i, temperature=0, max_new_tokens=8)[0] for p, i in zip(prompts, images, strict=True)]
    streamed = ["".join(lm.stream(p, images=i, temperature=0, max_new_tokens=8)) for p, i in zip(prompts, images,
                                                                                                strict=True)]
    assert batched == alone == streamed
    assert sorted(set(batched)) == sorted([*SHAPES, *(s for s, _ in SHAPES.values())])


def test_eval_task_scores_exact_match_by_question_type(vqa_run, vqa_data):
    scores = eval_task(vqa_run, vqa_data / "val.jsonl", max_new_tokens=8, log=lambda _: None)
    assert scores["items"] == 6 and scores["accuracy"] == scores["accuracy_color"] == scores["accuracy_shape"] == 1.0
    blank = eval_task(vqa_run, vqa_data / "val.jsonl", max_new_tokens=8, log=lambda _: None, blank_images=True)
    assert blank["accuracy_color"] <= 1 / 3  # one answer for all three colours: at most one right
    assert blank["loss"] > scores["loss"]  # the loss is of the blanked images too


def test_vqa_stage1_draws_only_its_question_types_then_all(tiny_pretrained, vqa_data):
    """--stage1-steps N --stage1-types shape: the batches of steps 0..N-1 ask shape questions only (read from the
    answers they train), the later ones both kinds; a type no record has is a clear error."""
    tokenizer, style = loading.load(tiny_pretrained).tokenizer, prompts.get("instruction")
    train, pixels, _ = load_vqa(vqa_data / "train.jsonl", tokenizer, 96, style, VisionConfig(image_tokens=1),
                             log=lambda _: None)
    task = vqa_task(train, pixels, train, pixels, tokenizer, style, TrainConfig(batch_size=4), 96, 8,
                    stage1_steps=5, stage1_kinds={"shape"})
    shapes, colors = {s for s, _ in SHAPES.values()}, set(SHAPES)

    def answers(step: int) -> set[str]:
        targets = task.sample_batch(step, 0)[1]
        return {tokenizer.decode([t for t in row.tolist() if t != IGNORE_INDEX][:-1]) for row in targets}

    assert set().union(*(answers(step) for step in range(5))) == shapes
    later = set().union(*(answers(step) for step in range(5, 8)))
    assert later & colors and later & shapes
    with pytest.raises(DataError, match="no training question has a type in stage1_types"):
        vqa_task(train, pixels, train, pixels, tokenizer, style, TrainConfig(batch_size=4), 96, 8, stage1_steps=5,
                 stage1_kinds={"size"})
    with pytest.raises(ConfigError, match="stage1_steps applies to task vqa only"):
        FinetuneConfig(task="sft", stage1_steps=5)


def test_vision_pretraining_teaches_the_tower_what_each_image_shows(vqa_data, tiny_pretrained, one_torch_thread):
    """pretrain_tower: linear heads on the tower learn each image's labels (an image without a shape label is left
    out of the shape loss); the returned scores are the heads' on the validation images."""
    pixels, labels = load_vqa(vqa_data / "train.jsonl", loading.load(tiny_pretrained).tokenizer, 96, prompts.get("instruction"),
                              VisionConfig(image_tokens=1), log=lambda _: None)[1:]
    assert labels == [{"color": c, "shape": s} for c, (s, _) in SHAPES.items()]
    torch.manual_seed(0)
    tower = VisionTower(VisionConfig(width=32, image_tokens=1), n_embd=32)
    partial = [labels[0], {"color": labels[1]["color"]}, labels[2]]
    untrained = pretrain_tower(tower, pixels, partial, 0, 6, 3e-3, 0, (pixels, labels), log=lambda _: None)
    scores = pretrain_tower(tower, pixels, partial, 40, 6, 3e-3, 0, (pixels, labels), log=lambda _: None)
    assert scores == {"vision_color": 1.0, "vision_shape": 1.0} != untrained


def test_image_labels_must_agree_and_pretraining_needs_them(vqa_data, tiny_pretrained, tmp_path):
    records = [json.loads(line) for line in (vqa_data / "train.jsonl").read_text().splitlines()]
    records[1]["image_labels"] = {"color": "red"}  # the yellow circle's other record says yellow
    (tmp_path / "images").symlink_to(vqa_data / "images")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match="train.jsonl:2: image_labels 'color' is 'red', another record of this image "
                                        "says 'yellow'"):
        load_vqa(tmp_path / "train.jsonl", loading.load(tiny_pretrained).tokenizer, 96, prompts.get("instruction"), VisionConfig(),
                 log=lambda _: None)
    for r in records:
        del r["image_labels"]
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg, ft = configs_from_sources(None, dict(init=str(tiny_pretrained), data=str(tmp_path), out=str(tmp_path / "run")),
                                   dict(task="vqa", method="full", vision_pretrain_steps=10))
    with pytest.raises(DataError, match="--vision-pretrain-steps needs records with image_labels"):
        finetune(cfg, ft, log=lambda _: None)
    with pytest.raises(ConfigError, match="vision_pretrain_steps applies to task vqa only"):
        FinetuneConfig(task="sft", vision_pretrain_steps=5)


def test_the_checkpoint_holds_the_vision_tower(vqa_run):
    loaded = loading.load(vqa_run)
    assert loaded.task == "vqa" and loaded.vision.config == VisionConfig(width=32, image_tokens=4)


def test_bad_images_are_clear_errors(lm, vqa_run, tmp_path):
    prompt = _prompt(lm, COLOR_Q)
    with pytest.raises(ImageError, match="not a readable image"):
        lm.generate(prompt, images=[b"this is not an image"])
    with pytest.raises(ImageError, match="over the limit"):
        load_image(_png(Image.new("L", (MAX_PIXELS // 1000 + 1, 1000))), 64)
    with pytest.raises(ImageError, match="unsupported image mode CMYK"):
        buffer = io.BytesIO()
        Image.new("CMYK", (8, 8)).save(buffer, format="JPEG")
        load_image(buffer.getvalue(), 64)
    with pytest.raises(GptlabError, match="1 <image> placeholder"):
        lm.generate(prompt, images=[_png(_draw("circle", (0, 0, 0)))] * 2)
    with pytest.raises(ImageError, match="only inline images"):
        decode_data_url("https://example.com/cat.png")
    (tmp_path / "fake.png").write_text("hello")
    result = run_cli("generate", "--ckpt", str(vqa_run), "--image", str(tmp_path / "fake.png"),
                     "--prompt", COLOR_Q)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"gptlab: error: {tmp_path / 'fake.png'} is not a readable image (UnidentifiedImageError)"]


def test_merge_keeps_the_vision_tower_and_text_only_exports_refuse_it(vqa_run, vqa_data, tmp_path, capsys):
    cli.main(["merge-lora", "--ckpt", str(vqa_run), "--out", str(tmp_path / "merged.pt")])
    assert checkpoint.load(tmp_path / "merged.pt")["finetune"]["base"] is None  # self-contained: no base to find
    merged = LanguageModel.load(tmp_path / "merged.pt")
    path = vqa_data / "images" / "blue.png"
    assert merged.generate(_prompt(merged, SHAPE_Q), images=[path], temperature=0, max_new_tokens=8) == ["triangle"]
    assert merged.generate(_prompt(merged, COLOR_Q), images=[path], temperature=0, max_new_tokens=8) == ["blue"]
    for command, target in ((["convert", "--to-hf", str(vqa_run)], "an HF GPT-2 export"),
                            (["export-lora", "--ckpt", str(vqa_run)], "a PEFT adapter on an HF GPT-2 base")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*command, "--out", str(tmp_path / "export")])
        assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines() == [
            f"gptlab: error: {vqa_run} is a multimodal (--task vqa) run and {target} cannot hold its vision tower; "
            "`gptlab merge-lora` writes one self-contained gptlab checkpoint with it"]
        assert not (tmp_path / "export").exists()


def _data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def vqa_server(vqa_run, tmp_path_factory):
    with ServerProcess(vqa_run, tmp_path_factory.mktemp("vqa-serve") / "serve.log", "--threads", "1") as server:
        yield server


def test_serve_answers_an_inline_image_through_the_openai_client(vqa_server, vqa_data):
    client = openai.OpenAI(base_url=vqa_server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    for color in SHAPES:
        out = client.chat.completions.create(model="run", temperature=0, max_tokens=8, messages=[{
            "role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(vqa_data / "images" / f"{color}.png")}},
                                        {"type": "text", "text": COLOR_Q}]}])
        assert out.choices[0].message.content == color
    with pytest.raises(openai.BadRequestError, match="only inline images are accepted") as err:
        client.chat.completions.create(model="run", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/shape.png"}}, {"type": "text", "text": "x"}]}])
    assert err.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match="not a readable image"):
        client.chat.completions.create(model="run", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"nope").decode()}}]}])
    # still serving after the bad requests
    out = client.chat.completions.create(model="run", temperature=0, max_tokens=8, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(vqa_data / "images" / "blue.png")}},
        {"type": "text", "text": SHAPE_Q}]}])
    assert out.choices[0].message.content == "triangle"


def test_playground_attaches_an_image_and_shows_the_answer(vqa_server, vqa_data, browser):  # noqa: F811
    page = browser.new_page(viewport={"width": 1100, "height": 640})
    page.goto(vqa_server.url + "/")
    page.wait_for_selector("#model:has-text('model: run')", timeout=60_000)  # a loaded machine is slow
    page.eval_on_selector("#temperature", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }")
    page.fill("#max-tokens", "8")
    page.set_input_files("#image", str(vqa_data / "images" / "green.png"))
    page.wait_for_selector("#attached img[src^='data:image/png;base64,']", timeout=30_000)
    page.fill("#input", COLOR_Q)
    page.press("#input", "Enter")
    reply = page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60_000)
    assert not page.query_selector(".msg.error")
    assert page.query_selector(".msg.user img[src^='data:image/png;base64,']")
    assert reply.query_selector(".text").text_content() == "green"
    page.close()
