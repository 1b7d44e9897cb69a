"""A local production-shaped registry: PostgreSQL + `mlflow server --app-name basic-auth`, on 127.0.0.1 only.

    export MLFLOW_AUTH_ADMIN_USERNAME=admin MLFLOW_AUTH_ADMIN_PASSWORD=...   # the server's first admin
    export WB_PG_PASSWORD=...          # optional: the database password (random per start when unset)
    python -m demo.mlflow_server DIR [--port 5001]        # foreground; Ctrl-C stops both

Then point a recipe at it (recipes/prod.yaml) with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD set.
Secrets travel only through the environment: the database password reaches PostgreSQL through a file
that is deleted after initdb and reaches MLflow as PGPASSWORD, never on a command line, in a config file
or in a log. The integration tests start and stop it through `LocalServer`.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from workbench.workspace import StageError

AUTH_INI = """[mlflow]
default_permission = READ
database_uri = {auth_db}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
"""


def postgres_bin() -> Path | None:
    """Directory of initdb/pg_ctl: the newest Debian-packaged PostgreSQL, or whatever PATH has."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """Start/stop PostgreSQL and the basic-auth MLflow server below `root`."""

    def __init__(self, root: Path, port: int | None = None, pg_port: int | None = None):
        self.root = Path(root).resolve()
        self.port = port or free_port()
        self.pg_port = pg_port or free_port()
        self.pg_password = os.environ.get("WB_PG_PASSWORD") or secrets.token_urlsafe(24)
        self.pg_user = "wb"
        self.mlflow_proc: subprocess.Popen | None = None
        self.pg_data: Path | None = None
        self._run_as: list[str] = []

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _pg(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*self._run_as, *cmd], check=True, capture_output=True, text=True, timeout=120, **kw)

    def start(self, timeout: float = 240) -> "LocalServer":
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()  # never leave a half-started PostgreSQL behind
            raise

    def _start(self, timeout: float) -> "LocalServer":
        if not os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
            raise StageError("set MLFLOW_AUTH_ADMIN_USERNAME and MLFLOW_AUTH_ADMIN_PASSWORD in the environment: "
                             "the server's first admin (no default password)")
        bindir = postgres_bin()
        if bindir is None:
            raise StageError("PostgreSQL is not installed (Debian: apt-get install postgresql; or `make sysdeps`)")
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root: run it as the packaged `postgres` user, in a directory it owns
            self._run_as = ["runuser", "-u", "postgres", "--"]
            self.pg_data = Path(tempfile.mkdtemp(prefix="wb-pg-"))
            shutil.chown(self.pg_data, "postgres", "postgres")
        else:
            self.pg_data = self.root / "pg"
            self.pg_data.mkdir(exist_ok=True)
        data, log = self.pg_data / "data", self.pg_data / "postgres.log"
        pwfile = self.pg_data / "pw"
        pwfile.write_text(self.pg_password + "\n")
        os.chmod(pwfile, 0o600)
        if self._run_as:
            shutil.chown(pwfile, "postgres", "postgres")
        try:
            self._pg(str(bindir / "initdb"), "-D", str(data), "-U", self.pg_user, "--pwfile", str(pwfile),
                     "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8")
        finally:
            pwfile.unlink(missing_ok=True)
        self._pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                 f"-c listen_addresses=127.0.0.1 -p {self.pg_port} -k ''", "start")
        self._create_databases()

        ini = self.root / "basic_auth.ini"
        ini.write_text(AUTH_INI.format(auth_db=self._db_uri("mlflow_auth")))
        artifacts = self.root / "artifacts"
        artifacts.mkdir(exist_ok=True)
        env = dict(os.environ, PGPASSWORD=self.pg_password, MLFLOW_AUTH_CONFIG_PATH=str(ini))
        env.setdefault("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
        # signs the UI's CSRF tokens; one server, so a fresh random key per start is enough unless set
        env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
               "--backend-store-uri", self._db_uri("mlflow"), "--artifacts-destination", artifacts.as_uri(),
               "--serve-artifacts", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self.log_path = self.root / "mlflow-server.log"
        self.mlflow_proc = subprocess.Popen(cmd, env=env, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self._wait_healthy(timeout)
        (self.root / "server.json").write_text(json.dumps(
            {"tracking_uri": self.tracking_uri, "mlflow_pid": self.mlflow_proc.pid, "pg_port": self.pg_port}) + "\n")
        return self

    def _db_uri(self, db: str) -> str:
        # no password here: libpq reads PGPASSWORD from the server's environment
        return f"postgresql+psycopg2://{self.pg_user}@127.0.0.1:{self.pg_port}/{db}"

    def _create_databases(self) -> None:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.pg_port, user=self.pg_user, password=self.pg_password,
                                dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            for db in ("mlflow", "mlflow_auth"):
                cur.execute(f"CREATE DATABASE {db}")
        conn.close()

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.mlflow_proc.poll() is not None:
                raise StageError(f"mlflow server exited {self.mlflow_proc.returncode}; see {self.log_path}:\n"
                                 + self.log_path.read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise StageError(f"mlflow server not healthy after {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.mlflow_proc is not None and self.mlflow_proc.poll() is None:
            # the server runs workers in its own session: stop the whole group, not just the parent
            os.killpg(self.mlflow_proc.pid, signal.SIGTERM)
            try:
                self.mlflow_proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.mlflow_proc.pid, signal.SIGKILL)
                self.mlflow_proc.wait(timeout=30)
        if self.pg_data is not None and (self.pg_data / "data").is_dir():
            bindir = postgres_bin()
            subprocess.run([*self._run_as, str(bindir / "pg_ctl"), "-D", str(self.pg_data / "data"), "-m", "fast",
                            "-w", "stop"], capture_output=True, timeout=120)
            if self._run_as:
                shutil.rmtree(self.pg_data, ignore_errors=True)
            self.pg_data = None

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.mlflow_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="where the server keeps its artifacts, auth config and logs")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args(argv)
    server = LocalServer(Path(args.dir), port=args.port)

    def _stop(signum, frame):
        raise KeyboardInterrupt  # SIGTERM too (and SIGINT even where a background shell ignored it)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        server.start()
    except StageError as exc:
        print(f"demo.mlflow_server: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(f"MLflow (basic-auth, PostgreSQL) at {server.tracking_uri}; Ctrl-C stops it", flush=True)
    try:
        while server.mlflow_proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
