"""sd-scripts' caption processing, verbatim, as the oracle for tests/test_data_captions.py.

Copied from kohya-ss/sd-scripts @ 48d368f, library/train_util.py lines 821-932 (`BaseDataset.process_caption`),
Apache License 2.0 (https://github.com/kohya-ss/sd-scripts/blob/main/LICENSE.md). Only the indentation changed:
it is a module-level function taking a stand-in for `self` (current_epoch, current_step, max_train_steps,
replacements). It uses the global `random` module, as sd-scripts does.
"""
# ruff: noqa

import math
import random
import re

def process_caption(self, subset, caption):
    # caption に prefix/suffix を付ける
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix

    # dropoutの決定：tag dropがこのメソッド内にあるのでここで行うのが良い
    is_drop_out = subset.caption_dropout_rate > 0 and random.random() < subset.caption_dropout_rate
    is_drop_out = (
        is_drop_out
        or subset.caption_dropout_every_n_epochs > 0
        and self.current_epoch % subset.caption_dropout_every_n_epochs == 0
    )

    if is_drop_out:
        caption = ""
    else:
        # process wildcards
        if subset.enable_wildcard:
            # if caption is multiline, random choice one line
            if "\n" in caption:
                caption = random.choice(caption.split("\n"))

            # wildcard is like '{aaa|bbb|ccc...}'
            # escape the curly braces like {{ or }}
            replacer1 = "⦅"
            replacer2 = "⦆"
            while replacer1 in caption or replacer2 in caption:
                replacer1 += "⦅"
                replacer2 += "⦆"

            caption = caption.replace("{{", replacer1).replace("}}", replacer2)

            # replace the wildcard
            def replace_wildcard(match):
                return random.choice(match.group(1).split("|"))

            caption = re.sub(r"\{([^}]+)\}", replace_wildcard, caption)

            # unescape the curly braces
            caption = caption.replace(replacer1, "{").replace(replacer2, "}")
        else:
            # if caption is multiline, use the first line
            caption = caption.split("\n")[0]

        if subset.shuffle_caption or subset.token_warmup_step > 0 or subset.caption_tag_dropout_rate > 0:
            fixed_tokens = []
            flex_tokens = []
            fixed_suffix_tokens = []
            if (
                hasattr(subset, "keep_tokens_separator")
                and subset.keep_tokens_separator
                and subset.keep_tokens_separator in caption
            ):
                fixed_part, flex_part = caption.split(subset.keep_tokens_separator, 1)
                if subset.keep_tokens_separator in flex_part:
                    flex_part, fixed_suffix_part = flex_part.split(subset.keep_tokens_separator, 1)
                    fixed_suffix_tokens = [t.strip() for t in fixed_suffix_part.split(subset.caption_separator) if t.strip()]

                fixed_tokens = [t.strip() for t in fixed_part.split(subset.caption_separator) if t.strip()]
                flex_tokens = [t.strip() for t in flex_part.split(subset.caption_separator) if t.strip()]
            else:
                tokens = [t.strip() for t in caption.strip().split(subset.caption_separator)]
                flex_tokens = tokens[:]
                if subset.keep_tokens > 0:
                    fixed_tokens = flex_tokens[: subset.keep_tokens]
                    flex_tokens = tokens[subset.keep_tokens :]

            if subset.token_warmup_step < 1:  # 初回に上書きする
                subset.token_warmup_step = math.floor(subset.token_warmup_step * self.max_train_steps)
            if subset.token_warmup_step and self.current_step < subset.token_warmup_step:
                tokens_len = (
                    math.floor(
                        (self.current_step) * ((len(flex_tokens) - subset.token_warmup_min) / (subset.token_warmup_step))
                    )
                    + subset.token_warmup_min
                )
                flex_tokens = flex_tokens[:tokens_len]

            def dropout_tags(tokens):
                if subset.caption_tag_dropout_rate <= 0:
                    return tokens
                l = []
                for token in tokens:
                    if random.random() >= subset.caption_tag_dropout_rate:
                        l.append(token)
                return l

            if subset.shuffle_caption:
                random.shuffle(flex_tokens)

            flex_tokens = dropout_tags(flex_tokens)

            caption = ", ".join(fixed_tokens + flex_tokens + fixed_suffix_tokens)

        # process secondary separator
        if subset.secondary_separator:
            caption = caption.replace(subset.secondary_separator, subset.caption_separator)

        # textual inversion対応
        for str_from, str_to in self.replacements.items():
            if str_from == "":
                # replace all
                if type(str_to) == list:
                    caption = random.choice(str_to)
                else:
                    caption = str_to
            else:
                caption = caption.replace(str_from, str_to)

    return caption
