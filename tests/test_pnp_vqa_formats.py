from capvqa.text.pnp_vqa_formats import clean_question, matching_text, unifiedqa_passages


def test_question_cleaning_follows_blip_question_processor():
    assert clean_question('What "is" (this)*#: thing; ~there! Really.?') == "what is this thing there really?"
    assert clean_question("Is it red, or blue?") == "is it red, or blue?"
    assert len(clean_question("word " * 80).split()) == 50


def test_matching_text_drops_trailing_question_mark():
    assert matching_text("What color is the bus?") == "what color is the bus"


def test_unifiedqa_passage_format_is_exact():
    passages = unifiedqa_passages("What is the Man holding?", ["A man holding an umbrella", "rain"])
    assert passages == [
        "what is the man holding? \\n a man holding an umbrella.",
        "what is the man holding? \\n rain.",
    ]
    assert "\n" not in passages[0] and "\\n" in passages[0]  # a literal backslash-n, not a newline


def test_several_captions_per_passage_are_joined_by_a_space():
    passages = unifiedqa_passages("why?", ["a", "b", "c"], captions_per_passage=2)
    assert passages == ["why? \\n a. b.", "why? \\n c."]
