"""What a benchmark's figures were measured on: the time (UTC), the machine and its load.

One home for the header lines of `make bench`, `make bench WHAT=growth`, the chip model's figure
files and the fleet run, so they all describe the machine the same way."""
import os
import platform
import time


def cpu_model():
    """The CPU's model name from /proc/cpuinfo ("unknown CPU" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def utc_now():
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def machine(with_platform=False):
    """'<CPU>, <n> CPUs, load <1-minute load average>[; <OS platform>]': the load counts, since
    other work on the machine slows every timed figure."""
    text = "%s, %d CPUs, load %.2f" % (cpu_model(), os.cpu_count() or 0, os.getloadavg()[0])
    return text + "; " + platform.platform() if with_platform else text


def when_and_where(with_platform=False):
    """'<UTC time>; <machine()>': the tail of a benchmark's first line."""
    return "%s; %s" % (utc_now(), machine(with_platform))


def figures_head(command):
    """The first line of a figures file: '# <command>, <UTC time>, <host name>; <machine()>'."""
    return "# %s, %s, %s; %s" % (command, utc_now(), os.uname().nodename, machine())
