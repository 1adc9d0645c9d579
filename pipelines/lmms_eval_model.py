"""ModRWKV as an lmms-eval model, "modrwkv" by name (lmms-eval 0.6 and later find it through the installed package's
entry point, `pipelines/lmms_eval_entry.py`), or passed as an object:

    lmms_eval.evaluator.simple_evaluate(model="modrwkv", tasks=["pope"],
        model_args="pretrained=runs/phase2,encoder=siglip2,encoder_dir=encoders/siglip2")
    lmms_eval.evaluator.simple_evaluate(model=ModRWKVEvalModel(pretrained="runs/phase2", encoder_dir=...),
                                        tasks=["pope"])

Each request's images go through the frozen encoder, then into the chat prompt ("User: <image>\\n{question}
\\n\\nAssistant:"). Generation is greedy. The module imports without lmms-eval installed (the class is then
a plain one with the same interface), so the project runs and tests it without that dependency.
"""

import torch
from PIL import Image

from modrwkv.conversation import TURN_END, prompt_ids
from modrwkv.generation import GenerationConfig, generate_text
from modrwkv.inference import prepare_for_inference
from modrwkv.multimodal import ModRWKV
from modrwkv.tokenizer import WorldTokenizer
from preprocessing.encoders import build_encoder
from preprocessing.encoders.recorded import encoder_for
from preprocessing.validate import Rejected, as_rgb

from .logged_models import local_model
from .trained_model import load_trained_model

try:
    from lmms_eval.api.model import lmms as EvalModelBase
    from lmms_eval.api.registry import register_model
except ImportError:
    class EvalModelBase:
        def __init__(self):
            self.task_dict = {}  # lmms-eval fills it: task name -> split -> doc_id -> doc

    def register_model(*names):
        return lambda cls: cls

DEFAULT_MAX_NEW_TOKENS = 128


@register_model("modrwkv")  # what lmms-eval before 0.2.3 read; 0.6 and later read the entry point
class ModRWKVEvalModel(EvalModelBase):
    """pretrained: a ModRWKV save_pretrained directory, full or adapter-only, a logged or registered model
    (models:/..., whose image encoder is the default encoder_dir), or the model; encoder_dir: the image
    encoder's weights, set up as the model's training caches were (kind, input size, layer: recorded beside the
    model; `encoder` names the kind where nothing is recorded), or an encoder object as `encoder`; quantize:
    "none", "int8" or "bf16" (modrwkv.quantize). A model object is prepared for inference in place (eval mode,
    moved to `device`, quantized) and records no encoder: name its kind with `encoder`. batch_size and
    max_batch_size are accepted because lmms-eval's command line passes them; requests run one at a time, each with
    its own images."""

    def __init__(self, pretrained, encoder=None, encoder_dir=None, device=None, batch_size=1, max_batch_size=None,
                 tokenizer: WorldTokenizer | None = None, quantize: str = "none"):
        super().__init__()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(pretrained, ModRWKV) and encoder is None and encoder_dir is not None:
            raise ValueError(f"encoder_dir {encoder_dir}: a model object records no encoder; name its kind with "
                             "encoder=, e.g. encoder='siglip2'")
        if not isinstance(pretrained, ModRWKV):  # a logged or registered model: its folder and the encoders it carries
            found = local_model(pretrained)
            pretrained, encoder_dir = found.model_dir, encoder_dir or found.encoder_dirs.get("image")
        # a full save, or an adapter-only one with its backbone recorded beside it (an s3:// one: this node's copy)
        model = pretrained if isinstance(pretrained, ModRWKV) else load_trained_model(str(pretrained))
        self.model = prepare_for_inference(model.to(self.device), quantization=quantize)
        # a kind (or none) is set up as the training caches were; an encoder object is used as given
        by_kind = encoder is None or isinstance(encoder, str)
        if by_kind and encoder_dir is not None and not isinstance(pretrained, ModRWKV):
            encoder = encoder_for(pretrained, "image", encoder_dir, encoder, device=self.device)
        elif isinstance(encoder, str):
            encoder = build_encoder(encoder, encoder_dir, device=self.device)
        self.encoder = encoder
        if self.encoder is not None and "image" not in self.model.projectors:
            raise ValueError("an image encoder was given but the model has no image projector "
                             f"({sorted(self.model.projectors)})")
        self.tokenizer = tokenizer or WorldTokenizer()

    def request_inputs(self, context: str, visuals, name: str) -> tuple[list[int], list]:
        """(prompt ids, image features) for one request. Tasks that do not place the images themselves get
        them before the question, as in training."""
        images = list(visuals or [])
        if not images:
            return prompt_ids(self.tokenizer, context, [], name), []
        if self.encoder is None:
            raise ValueError(f"{name}: the request has images but no image encoder was given")
        if not all(isinstance(im, Image.Image) for im in images):
            kinds = sorted({type(im).__name__ for im in images})
            raise ValueError(f"{name}: only PIL images are supported, got {kinds}")
        try:  # as the encode job decodes its images (16-bit ones scaled, not clipped)
            rgb = [as_rgb(im) for im in images]
        except Rejected as e:
            raise Rejected(f"{name}: {e}") from e
        features = self.encoder.encode(rgb, [f"{name}/{i}" for i in range(len(images))])
        if "<image>" not in context:
            context = " ".join(["<image>"] * len(images)) + "\n" + context
        lengths = [self.model.config.projectors["image"].compressed_length(f.shape[0]) for f in features]
        return prompt_ids(self.tokenizer, context, lengths, name), [("image", f.to(self.device)) for f in features]

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(sum of the target tokens' log-probs after the prompt, whether greedy decoding would produce them)."""
        results = []
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            target = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            name = f"{task}/{split}/{doc_id}"
            ids, features = self.request_inputs(context, doc_to_visual(doc), name)
            # the answer follows "Assistant:" after a space, as tokenize_conversation lays out training samples
            target_ids = self.tokenizer.encode(target if target[:1].isspace() else f" {target}")
            embeds = self.model.embed(torch.tensor([ids + target_ids], device=self.device), [features],
                                      sample_ids=[name])
            hidden, _ = self.model.backbone.forward_hidden(inputs_embeds=embeds)
            # position t predicts token t + 1: the logits from the prompt's last token on score the target
            logits = self.model.backbone.head(hidden[0, len(ids) - 1 : -1]).float()
            targets = torch.tensor(target_ids, device=self.device)
            log_prob = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum()
            results.append((float(log_prob), bool((logits.argmax(-1) == targets).all())))
        return results

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        """Greedy answers, cut at the first of gen_kwargs["until"] or the end of the assistant's turn."""
        answers = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            until = gen_kwargs.get("until") or []
            stops = [s for s in ([until] if isinstance(until, str) else until) if s] + [TURN_END]
            name = f"{task}/{split}/{doc_id}"
            ids, features = self.request_inputs(context, doc_to_visual(doc), name)
            max_new_tokens = int(gen_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
            answers.append(self.greedy_until(ids, features, stops, max_new_tokens, name))
        return answers

    def greedy_until(self, ids: list[int], features, stops: list[str], max_new_tokens: int, name: str) -> str:
        """Decodes until a stop string appears (the text is cut before it), END_OF_TEXT or max_new_tokens."""
        logits, state = self.model.prefill(torch.tensor([ids], device=self.device), [features], sample_ids=[name])
        config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0)
        return generate_text(self.model.backbone, self.tokenizer, ids, config, state=state, first_logits=logits,
                             stop_texts=stops).strip()

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the modrwkv model answers single-round requests only")
