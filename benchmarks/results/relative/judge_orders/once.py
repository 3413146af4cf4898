"""The LLM judge asked once per pair (earlier response first), as the RL module asked every pairwise reward before
da62dce: declaring it antisymmetric makes `score_pairs` skip the reversed order."""
from modules.judges import LLMJudge


class AskedOnce(LLMJudge):
    antisymmetric = True
