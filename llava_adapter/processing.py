"""`DoveLlavaProcessor`: the DOVE image processor, the LLM tokenizer and the conversation template as one
transformers processor, saved with every model so that `AutoProcessor.from_pretrained(dir)` gives it back.

    processor = AutoProcessor.from_pretrained(model_dir)                # after `import llava_adapter`
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    new_tokens = model.generate(**inputs, max_new_tokens=16)
    print(processor.batch_decode(new_tokens, skip_special_tokens=True))

The prompt is rendered and tokenized exactly as fine-tuning rendered it (`conversation.render_conversation`
with the model's `conversation_template`). For Q-DOVE the output also carries `queries`, one per image: the
question that follows the image's `<image>` placeholder in its user turn, cleaned as training cleaned it
(`tower_query`), unless `queries=` is given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from transformers import BatchFeature, PreTrainedTokenizerBase
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin

from tokenizer import DoveImageProcessor

from .constants import IMAGE_TOKEN
from .conversation import Turn, render_conversation, resolve_template, tower_query

# A question no real prompt holds: rendering it shows what a template writes after a user turn.
_SENTINEL = "\u2063dove-question\u2063"


class DoveLlavaImageProcessor(BaseImageProcessor, DoveImageProcessor):
    """`DoveImageProcessor` (resize, centre crop, pixels in [0, 1]) with transformers' save / load API.

    A subclass rather than a wrapper so that code given the tower's processor (`to_tensor`, `geometry`,
    LLaVA's `image_mean` / `crop_size`) takes this one unchanged; `AutoImageProcessor` needs a
    `BaseImageProcessor` to register it.
    """

    model_input_names: ClassVar[list[str]] = ["pixel_values"]

    def __init__(self, image_size: int = 256, **kwargs: Any) -> None:
        for mirrored in ("image_mean", "image_std", "size", "crop_size"):  # recomputed from image_size
            kwargs.pop(mirrored, None)
        BaseImageProcessor.__init__(self, **kwargs)
        DoveImageProcessor.__init__(self, image_size)

    def __call__(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **_: Any) -> BatchFeature:
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        return BatchFeature({"pixel_values": self.to_tensor(images)})

    def fetch_images(self, images: Any) -> Any:
        """Paths stay paths: `to_tensor` opens them with the project's decoder, whose errors name the file."""
        return images

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_processor_type": type(self).__name__,
            "image_size": self.image_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "size": dict(self.size),
            "crop_size": dict(self.crop_size),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size})"


class DoveLlavaProcessor(ProcessorMixin):
    """Images -> `pixel_values`, prompts -> `input_ids` / `attention_mask`, questions -> the tower's `queries`.

    `conversation_template` is the model's (`auto`, `chat_template`, `vicuna_v1`, `plain`); `apply_chat_template`
    renders with it and `__call__` tokenizes as training did (special tokens added except under the LLM's own
    chat template, which writes them itself).
    """

    def __init__(
        self,
        image_processor: DoveLlavaImageProcessor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        conversation_template: str = "auto",
    ) -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.conversation_template = resolve_template(tokenizer, conversation_template)

    @classmethod
    def for_model(cls, model: Any, tokenizer: PreTrainedTokenizerBase) -> DoveLlavaProcessor:
        """The processor of a `DoveLlavaForCausalLM`: its tower's image size and its conversation template."""
        return cls(
            DoveLlavaImageProcessor(model.vision_tower.config.image_size),
            tokenizer,
            conversation_template=model.config.conversation_template,
        )

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        queries: Sequence[str | None] | None = None,
        return_tensors: str | None = "pt",
        **tokenizer_kwargs: Any,
    ) -> BatchFeature:
        """`text`: one prompt or a list; each `<image>` in reading order takes the next of `images`.

        `queries` (one per image) replace the questions read from the prompts as the tower's queries.
        """
        if images is None and text is None:
            raise ValueError("DoveLlavaProcessor needs images, text or both")
        data: dict[str, Any] = {}
        num_images = 0
        if images is not None:
            if isinstance(images, (list, tuple)) and all(isinstance(i, (list, tuple)) for i in images):
                images = [image for sample in images for image in sample]  # one list per prompt, as HF batches
            data["pixel_values"] = self.image_processor(images)["pixel_values"]
            num_images = int(data["pixel_values"].shape[0])
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            placeholders = sum(t.count(IMAGE_TOKEN) for t in texts)
            if placeholders != num_images:
                raise ValueError(
                    f"the text holds {placeholders} {IMAGE_TOKEN} placeholder(s) for {num_images} image(s); "
                    f"each image needs one (apply_chat_template writes it for an image item)"
                )
            tokenizer_kwargs.setdefault("add_special_tokens", self.conversation_template != "chat_template")
            tokenizer_kwargs.setdefault("padding", len(texts) > 1)
            data.update(self.tokenizer(texts, return_tensors=return_tensors, **tokenizer_kwargs))
            if num_images:
                derived = [q for t in texts for q in self.prompt_queries(t)]
                data["queries"] = list(queries) if queries is not None else derived
        elif queries is not None:
            data["queries"] = list(queries)
        if "queries" in data and len(data["queries"]) != num_images:
            raise ValueError(f"queries has {len(data['queries'])} entries for {num_images} image(s)")
        return BatchFeature(data, tensor_type=None)

    def prompt_queries(self, prompt: str) -> list[str | None]:
        """One query per `<image>` of a rendered prompt: the text after the placeholder up to the end of its
        user turn, as `tower_query` cleans it; None where the template shows no question (`plain`)."""
        end_of_turn = self._end_of_user_turn()
        queries: list[str | None] = []
        for after in prompt.split(IMAGE_TOKEN)[1:]:
            if end_of_turn and end_of_turn in after:
                after = after[: after.index(end_of_turn)]
            queries.append(tower_query(after) or None)
        return queries

    def _end_of_user_turn(self) -> str | None:
        """What the template writes between a user turn's text and the answer (e.g. vicuna_v1's ` ASSISTANT:`)."""
        text, spans = render_conversation(
            [Turn("user", f"{IMAGE_TOKEN}\n{_SENTINEL}"), Turn("assistant", "")],
            self.tokenizer,
            self.conversation_template,
        )
        prompt = text[: spans[0][0]]
        if _SENTINEL not in prompt:
            return None
        return prompt.split(_SENTINEL, 1)[1].strip() or None

    def apply_chat_template(
        self,
        conversation: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Messages (`{"role", "content"}`, content a string or a list of `{"type": "image"}` / `{"type":
        "text", "text": ...}` items) -> the prompt text in the model's conversation template.

        An image item becomes `<image>\\n` where it stands. With `tokenize=True` the images named by the items
        (`image`, `url` or `path`) go through `__call__` too, and the output is its `BatchFeature` (or only
        `input_ids` without `return_dict`).
        """
        turns, images = [], []
        for index, message in enumerate(conversation):
            role = message.get("role")
            if role not in ("user", "assistant"):
                raise ValueError(f"message {index}: role must be 'user' or 'assistant', got {role!r}")
            content = message.get("content", "")
            if isinstance(content, str):
                turns.append(Turn(role, content))
                continue
            pieces = []
            for item in content:
                kind = item.get("type")
                if kind == "image":
                    pieces.append(f"{IMAGE_TOKEN}\n")
                    source = next((item[k] for k in ("image", "url", "path") if item.get(k) is not None), None)
                    if source is not None:
                        images.append(source)
                elif kind == "text":
                    pieces.append(item.get("text", ""))
                else:
                    raise ValueError(f"message {index}: content items must be of type 'image' or 'text', got {kind!r}")
            turns.append(Turn(role, "".join(pieces)))
        if add_generation_prompt:
            turns.append(Turn("assistant", ""))
        text, spans = render_conversation(turns, self.tokenizer, self.conversation_template)
        prompt = text[: spans[-1][0]] if add_generation_prompt else text
        if not tokenize:
            return prompt
        out = self(images=images or None, text=prompt, **kwargs)
        return out if return_dict else out["input_ids"]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "queries"]
