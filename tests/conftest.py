import os
import signal
import subprocess

os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_group(cmd, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run in its own session: on timeout the whole process tree (launcher agent and
    its workers) is killed, so a hung test leaves no orphans behind."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    if kwargs.pop("capture_output"):
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
    with subprocess.Popen(cmd, start_new_session=True, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        finally:
            try:  # workers the agent orphaned on exit
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
