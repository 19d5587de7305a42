"""Metrics against hand-computed cases."""

from __future__ import annotations

import pytest

from heterocache.eval import metrics as M
from heterocache.eval.tasks.infinitebench import score_infinitebench
from heterocache.eval.tasks.longbench import score_longbench


class TestStringMatch:
    def test_all_counts_the_share_of_answers_found_ignoring_case(self):
        assert M.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(
            2 / 3
        )
        assert M.string_match_all("VAR abcde", ["ABCDE"]) == 1.0
        assert M.string_match_all("nothing", ["123"]) == 0.0

    def test_part_needs_any_one_answer(self):
        assert M.string_match_part("it is Paris", ["London", "paris"]) == 1.0
        assert M.string_match_part("it is Rome", ["London", "Paris"]) == 0.0


class TestQaF1:
    def test_normalisation_drops_case_punctuation_and_articles(self):
        assert M.normalize_answer("The  Cat, sat on a MAT!") == "cat sat on mat"
        assert M.qa_f1("Paris.", "paris") == 1.0

    def test_partial_overlap(self):
        # pred "cat sat on mat" (4 tokens), ref "cat on mat" (3): 3 shared -> P 3/4, R 1, F1 6/7.
        assert M.qa_f1("The cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)

    def test_shared_tokens_count_with_multiplicity(self):
        # x,x,y vs x,y,y share one x and one y: P = R = 2/3.
        assert M.token_f1(["x", "x", "y"], ["x", "y", "y"]) == pytest.approx(2 / 3)

    def test_no_overlap_or_empty_is_zero(self):
        assert M.qa_f1("blue", "green") == 0.0
        assert M.qa_f1("", "green") == 0.0

    def test_chinese_f1_is_over_characters(self):
        # "北京大学" vs "北京": 2 shared characters -> P 2/4, R 1, F1 2/3.
        assert M.qa_f1_zh("北京大学。", "北京") == pytest.approx(2 / 3)


class TestRougeL:
    def test_lcs_of_a_classic_pair(self):
        assert M.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4

    def test_f1_from_lcs(self):
        # LCS "the cat on the mat" = 5 of 6 tokens on each side.
        assert M.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
        # LCS 2; P = 2/4, R = 2/2 -> F = 2/3.
        assert M.rouge_l("a b c d", "b d") == pytest.approx(2 / 3)

    def test_tokens_are_lower_case_words_and_single_cjk_characters(self):
        assert M.rouge_tokens("The Cat's hat, 2024!") == ["the", "cat", "s", "hat", "2024"]
        assert M.rouge_tokens("会议 ok") == ["会", "议", "ok"]
        assert M.rouge_l("", "something") == 0.0
        assert M.rouge_l("Same words.", "same WORDS") == 1.0


class TestCode:
    def test_edit_similarity_is_difflib_ratio(self):
        # "kitten"/"sitting": matching blocks "itt" + "n" = 4 characters; 2*4 / (6+7).
        assert M.edit_similarity("kitten", "sitting") == pytest.approx(8 / 13)
        assert M.edit_similarity("same", "same") == 1.0

    def test_code_similarity_scores_the_first_line_that_is_not_a_comment_or_fence(self):
        prediction = "```python\n# the next line\n    return width * height\n```"
        assert M.code_sim_score(prediction, "    return width * height") == 1.0
        assert M.code_sim_score("\n\nx = 1", "x = 2") == pytest.approx(0.8)


class TestLongBenchSpecific:
    CLASSES = ["Individual", "Number of something", "City", "Other location", "Location"]

    def test_classification_shares_credit_between_matched_classes(self):
        assert M.classification_score("Other location", "Other location", self.CLASSES) == 1.0
        # "Location" is a substring of the reference and is dropped; "City" stays: 1/2.
        assert M.classification_score("City or Other location", "Other location", self.CLASSES) == 0.5
        assert M.classification_score("Individual", "Other location", self.CLASSES) == 0.0

    def test_count_and_retrieval_share_of_numbers(self):
        assert M.count_score("There are 3 unique paragraphs, not 4", "3") == 0.5
        assert M.retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
        assert M.retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 12") == 0.5
        assert M.retrieval_score("段落5", "段落5", zh=True) == 1.0

    def test_first_line_only_and_best_reference(self):
        # trec/triviaqa/samsum/lsht keep the first line of the reply; the best answer counts.
        assert score_longbench("triviaqa", "\nParis\nExplanation: London", ["London", "Paris"], None) == 1.0
        assert score_longbench("hotpotqa", "London", ["Paris", "London"], None) == 1.0


class TestChoiceExtraction:
    @pytest.mark.parametrize(
        "reply, letter",
        [
            ("The correct answer is (B).", "B"),
            ("**The correct answer is C**", "C"),
            ("I think it is B", None),
            ("The correct answer is (E)", None),
        ],
    )
    def test_longbench_v2_pattern(self, reply, letter):
        assert M.extract_choice(reply) == letter


class TestInfiniteBenchScorers:
    def test_passkey_takes_the_first_integer(self):
        assert score_infinitebench("passkey", "The pass key is 71432.", ["71432"]) == 1.0
        assert score_infinitebench("passkey", "7 then 71432", ["71432"]) == 0.0

    def test_kv_retrieval_needs_the_value_as_a_word(self):
        assert score_infinitebench("kv_retrieval", 'The value is "abc-1".', ["abc-1"]) == 1.0
        assert score_infinitebench("kv_retrieval", "abc-12", ["abc-1"]) == 0.0

    def test_choice_accepts_the_letter_or_the_option_text(self):
        label = ["He lit the lamp", "B"]
        assert score_infinitebench("longbook_choice_eng", "B. He lit the lamp", label) == 1.0
        assert score_infinitebench("longbook_choice_eng", "He lit the lamp", label) == 1.0
        assert score_infinitebench("longbook_choice_eng", "The answer is: A", label) == 0.0

    def test_code_run_reads_the_last_number_and_math_find_the_first(self):
        assert score_infinitebench("code_run", "func_2(3) returns 8", 8) == 1.0
        assert score_infinitebench("math_find", "9, because", [9]) == 1.0
        assert score_infinitebench("math_find", "9.5", [9]) == 0.0

    def test_math_calc_counts_correct_values_before_the_first_error(self):
        assert score_infinitebench("math_calc", "[1, 4, 9, 5]", [[1, 4, 8, 5]]) == 0.5
