"""Adversarial-suffix analysis (PAPER.md section 7): GCG search, and how suffixes act on the direction.

Modules: ``tokens`` (where a suffix goes in a prompt; allowed and random suffix tokens), ``gcg`` (the
search), ``trace`` (one measuring forward pass), ``suffix`` (the conditions and their cosine, head
attribution, attention shares and refusal), ``plots``, and ``cli`` (the ``refusalkit suffix`` command).
"""
