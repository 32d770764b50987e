"""A user's plugin: renders a page with the markdown package (given to the
sandbox with ``packages=["markdown"]``), tables from markdown's extension."""

import markdown

RENDERED = 0  # each call runs in a fresh guest: this never goes past 1

# A warm pool imports this module in each guest before its call comes
# (preload=): markdown's first use (finding its extensions, compiling its
# patterns) done here is not done again by the call.
markdown.markdown("# warm\n\n|a|\n|-|\n|1|", extensions=["tables"])


def render(title, rows):
    global RENDERED
    RENDERED += 1
    table = "| item | count |\n|---|---|\n" + "".join(f"| {name} | {count} |\n" for name, count in rows)
    html = markdown.markdown(f"# {title}\n\n{table}", extensions=["tables"])
    return {"html": html, "rendered_in_this_guest": RENDERED}
