#!/usr/bin/env python3
"""Writes the Unicode class table of medbot's Llama 3 pre-tokenizer into medbot.c.

    regenerate:  python3 tests/ref/make_unicode_tables.py        (from the repo root, with
                 tests/ref/requirements.txt installed; on the dev machines /work/venv/bin/python)
    needs:       unicodedata2==16.0.0, tokenizers, tiktoken (tests/ref/requirements.txt)

The Llama 3 regex needs three classes: \\p{L} (general category L*), \\p{N} (N*) and \\s. Both
reference libraries use Unicode 16.0 tables (probed: Garay/Kirat Rai digits, new in 16.0, are
\\p{N} to both; Sidetic letters, new in 17.0, are not \\p{L}), so the table comes from
unicodedata2 16.0.0, not from this Python's unicodedata (3.11 ships Unicode 14.0). \\s is the
White_Space property (PropList.txt, unchanged since Unicode 6.3), which is what Oniguruma (HF
tokenizers) and the Rust regex crate (tiktoken) both use for \\s; note that Python's
str.isspace() differs (it also accepts U+001C..U+001F).

The table is a sorted list of (first code point << 3 | class): a code point has the class of the
last entry at or below it; ASCII also has a direct table. Classes: 0 other, 1 letter, 2 number, 3 whitespace, 4 CR or LF.

Before writing, the script checks every code point (surrogates aside) against the pre-tokenizer
of weights/llama3/tokenizer.json run by `tokenizers`, and tiktoken's ids against `tokenizers`'
ids on the same sweep text. It refuses to write a table the references disagree with.
"""
import os
import re
import sys

import unicodedata2 as ud

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
UNICODE_VERSION = "16.0.0"
WHITE_SPACE = set([0x9, 0xA, 0xB, 0xC, 0xD, 0x20, 0x85, 0xA0, 0x1680, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
                  + list(range(0x2000, 0x200B)))
OTHER, LETTER, NUMBER, SPACE, NEWLINE = range(5)


def char_class(cp):
    if cp in (0xA, 0xD):
        return NEWLINE
    if cp in WHITE_SPACE:
        return SPACE
    cat = ud.category(chr(cp))
    if cat[0] == "L":
        return LETTER
    if cat[0] == "N":
        return NUMBER
    return OTHER


def reference_classes():
    """Classes as the tokenizers pre-tokenizer sees them, for every code point but surrogates."""
    import tokenizers
    pre = tokenizers.Tokenizer.from_file(os.path.join(ROOT, "weights/llama3/tokenizer.json")).pre_tokenizer
    out = {}
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    step = 4096
    for b in range(0, len(cps), step):
        chunk = cps[b:b + step]
        # "aXa": one piece if X is a letter; "a","Xa" if X is other or (non-newline) whitespace;
        # "a","X","a" if X is a number, CR or LF. "1X": one piece iff X is a number.
        # "!X\n": one piece if X is other; "!","X\n" if X is whitespace.
        text, at = [], []
        pos = 0
        for c in chunk:
            s = "a" + chr(c) + "a\n1" + chr(c) + "\n!" + chr(c) + "\n"
            text.append(s)
            at.append(pos)
            pos += len(s)
        bounds = set(off[0] for _, off in pre.pre_tokenize_str("".join(text)))
        for c, o in zip(chunk, at):
            b1, b2, b5, b8 = (o + 1) in bounds, (o + 2) in bounds, (o + 5) in bounds, (o + 8) in bounds
            if not b1 and not b2:
                k = LETTER
            elif b1 and b2:
                k = NEWLINE if b5 else NUMBER
            else:
                k = SPACE if b8 else OTHER
            out[c] = k
    return out


def check_tiktoken_agrees():
    import tiktoken
    import tokenizers
    from tiktoken.load import load_tiktoken_bpe
    pat = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
           "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
    enc = tiktoken.Encoding("llama3", pat_str=pat,
                            mergeable_ranks=load_tiktoken_bpe(os.path.join(ROOT, "weights/llama3/tokenizer.model")),
                            special_tokens={})
    hf = tokenizers.Tokenizer.from_file(os.path.join(ROOT, "weights/llama3/tokenizer.json"))
    bad = 0
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    for b in range(0, len(cps), 2048):
        text = "".join("a" + chr(c) + "a\n1" + chr(c) + "\n!" + chr(c) + "\n" for c in cps[b:b + 2048])
        if enc.encode_ordinary(text) != hf.encode(text, add_special_tokens=False).ids:
            bad += 1
            print(f"tiktoken and tokenizers disagree on the sweep block at U+{cps[b]:04X}", file=sys.stderr)
    return bad


def main():
    assert ud.unidata_version == UNICODE_VERSION, f"need unicodedata2=={UNICODE_VERSION}, have {ud.unidata_version}"
    mine = {c: char_class(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF}
    ref = reference_classes()
    diff = [c for c in mine if mine[c] != ref[c]]
    for c in diff[:20]:
        print(f"U+{c:04X}: table {mine[c]}, tokenizers {ref[c]}", file=sys.stderr)
    if diff:
        sys.exit(f"{len(diff)} code points differ from tokenizers; table not written")
    if check_tiktoken_agrees():
        sys.exit("tiktoken disagrees with tokenizers; table not written")
    print(f"all {len(mine)} code points agree with tokenizers; tiktoken agrees on the sweep")

    starts, prev = [], -1
    for c in range(0x110000):
        k = mine.get(c, OTHER)  # surrogates never reach the pre-tokenizer (not valid UTF-8)
        if k != prev:
            starts.append(c << 3 | k)
            prev = k
    lines = [f"/* BEGIN unicode table: generated by tests/ref/make_unicode_tables.py from Unicode {UNICODE_VERSION} */",
             f"static const uint32_t mb_uni_starts[{len(starts)}] = {{"]
    for i in range(0, len(starts), 10):
        lines.append("    " + " ".join(f"0x{v:06x}," for v in starts[i:i + 10]))
    lines += ["};", "static const uint8_t mb_uni_ascii[128] = {"]
    for i in range(0, 128, 32):
        lines.append("    " + " ".join(f"{mine[c]}," for c in range(i, i + 32)))
    lines += ["};", "static MbUniTable mb_uni_table(void) {",
              "    MbUniTable t = {mb_uni_starts, sizeof mb_uni_starts / sizeof *mb_uni_starts, mb_uni_ascii};",
              "    return t;", "}", "/* END unicode table */"]
    path = os.path.join(ROOT, "medbot.c")
    src = open(path, encoding="utf-8").read()
    new, n = re.subn(r"/\* BEGIN unicode table.*?/\* END unicode table \*/", lambda m: "\n".join(lines), src,
                     flags=re.S)
    if n != 1:
        sys.exit("medbot.c has no '/* BEGIN unicode table ... END unicode table */' block")
    if new != src:
        open(path, "w", encoding="utf-8").write(new)
    print(f"medbot.c: {len(starts)} class boundaries (Unicode {UNICODE_VERSION})")


if __name__ == "__main__":
    main()
