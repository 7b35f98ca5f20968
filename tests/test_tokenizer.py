"""The tokenizer wrapper: continuation text keeps the leading space a SentencePiece-style decoder drops, and chat
templates render as transformers renders them."""

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from tilert_jax.tokenizer import Tokenizer


def metaspace_tokenizer() -> Tokenizer:
    inner = HFTokenizer(models.WordLevel({"▁Hello": 0, "▁world": 1, "<unk>": 2}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Metaspace()
    inner.decoder = decoders.Metaspace()
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}" \
               "<assistant>{% endif %}"
    return Tokenizer(inner, {"eos_token": "<unk>"}, template)


def test_continuation_keeps_the_leading_space():
    tok = metaspace_tokenizer()
    assert tok.encode("Hello world") == [0, 1]
    assert tok.decode([1]) == "world"  # alone, the decoder drops the word-initial space
    assert tok.decode_continuation([0], [1]) == " world"


def test_chat_template_renders_one_user_turn():
    tok = metaspace_tokenizer()
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi<assistant>"
    assert tok.token_id(tok.eos_token) == 2
