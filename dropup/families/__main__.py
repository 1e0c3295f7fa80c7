"""`python -m dropup.families`: the supported families as the markdown table of docs/converter.md."""

from dropup.families import table

print(table())
