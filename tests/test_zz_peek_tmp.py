from test_engine import *
def test_peek(engine):
    for c in engine.generate(encode(engine), SamplingParams(max_new_tokens=12, temperature=0)):
        print(c.finish_reason, c.token_ids, repr(c.text))
