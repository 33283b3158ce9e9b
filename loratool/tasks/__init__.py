"""Operations on files: each opens its inputs (io), computes (ops) and writes its output (io), and returns a
result the CLI renders. `import loratool` exposes them; none prints or exits."""
