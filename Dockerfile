# One image for every role; the command picks the role (`alliance serve --service NAME`).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
RUN pip install --no-cache-dir uv
COPY . /app
# Compiled once here: the files are read-only at run time, and without bytecode every worker
# would compile its imports (seconds) at each start.
RUN uv pip install --system --no-cache --compile-bytecode -e . && python -m compileall -q shared services gateway
RUN useradd --create-home alliance && mkdir -p /app/data && chown alliance /app/data
USER alliance
EXPOSE 8080
CMD ["alliance", "serve", "--service", "all", "--host", "0.0.0.0"]
