"""Streaming with provenance: which drafter proposed each token, and where the target corrected a draft."""

from transformers.generation.streamers import BaseStreamer


class ProvenanceStreamer(BaseStreamer):
    """Calls `on_tokens(token_ids, sources)` once per round, in order, each token once.

    sources[i] is the route ("eagle3", "dflash" or "lookup") for an accepted draft, "correction" for the
    target's token that replaced a rejected draft, and "target" for the target's own token (the prefill's
    first token, the bonus after a fully accepted draft, or a round without drafts). `stats` is the
    GenerationStats of the generation being streamed, readable from any thread (the demo's UI reads
    it while another thread generates).
    """

    def __init__(self, assistant, on_tokens):
        self.assistant, self.on_tokens = assistant, on_tokens
        self.prompt_seen = False
        self.stats = None

    def put(self, value):
        if not self.prompt_seen:  # generate() streams the prompt first, before its candidate generator exists
            self.prompt_seen = True
            return
        # put() runs in the generating thread: the assistant's stats there are this generation's.
        self.stats = self.assistant.stats
        tokens = value.reshape(-1).tolist()
        round_ = self.stats.in_flight  # transformers streams before it reports the round
        drafts = round_.draft_ids if round_ is not None else []
        accepted = 0  # leading tokens that are drafts (all of them when EOS or max_length cut the round short)
        while accepted < min(len(tokens), len(drafts)) and tokens[accepted] == drafts[accepted]:
            accepted += 1
        sources = [round_.route] * accepted if accepted else []
        if accepted < len(tokens):
            sources.append("correction" if accepted < len(drafts) else "target")
        self.on_tokens(tokens, sources)

    def end(self):
        pass


class TokenTexts:
    """The text each new token adds to a growing generation (decoding differences, so characters split
    over several tokens come out whole)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.text = tokenizer, [], ""

    def add(self, tokens: list[int]) -> list[str]:
        pieces = []
        for token in tokens:
            self.tokens.append(token)
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            pieces.append(text[len(self.text):] if text.startswith(self.text) else text)
            self.text = text
        return pieces
