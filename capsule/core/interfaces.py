"""
The interfaces capsule's parts meet at.
"""

from zope.interface import Attribute, Interface


class IDockerAPI(Interface):
    """
    The Docker engine, as Deferreds.  Every method returns a Deferred and
    never blocks the reactor.  Failures are L{capsule.core.errors.DockerError}s:
    every method fails with L{capsule.core.errors.DockerUnavailable} when the
    engine cannot be reached.  C{tests/engine_contract.py} is the executable
    form of this description; it runs against the fake and the real engine.
    """

    def ping():
        """
        Fire with the engine's version information.  Health checks call it:
        it is never queued behind the other calls, so it measures the
        engine, not how busy capsule is.
        """

    def container_sizes(labels):
        """
        Fire with the writable layer size, in bytes, of each running
        container carrying all of C{labels}, by container id (slow: the
        engine walks each layer).
        """

    def disk_usage(labels, volumes=False):
        """
        Fire with a L{capsule.core.diskuse.DiskUsage}: the writable layer
        size and the mounted volumes of each running container carrying all
        of C{labels}, and with C{volumes}, every volume's size (one more
        call, and slower still: the engine walks each volume).
        """

    def info():
        """
        Fire with the engine's system information (C{docker info}).
        """

    def image_exists(image):
        """
        Fire with whether C{image} is present in the engine; like L{ping},
        never queued behind the other calls.
        """

    def create_session_container(session_id, spec):
        """
        Create and start a container for session C{session_id} from the
        L{capsule.engine.docker.ContainerSpec} C{spec} (whose labels name the
        session; the container's name is random and says nothing of it);
        fire with its id.  Fail with L{capsule.core.errors.ImageMissing} if
        the image is not there.
        """

    def inspect_network(name):
        """
        Fire with what capsule needs of the network C{name} (a dict of
        C{id}, C{name}, C{driver}, C{options}, C{labels}, C{subnets},
        C{gateways}), or C{None} if there is none.
        """

    def network_addresses(name):
        """
        Fire with the addresses of the containers on the network C{name}
        (C{{address: container id}}; empty if there is no such network).
        """

    def ensure_network(name, options, labels, internal=False):
        """
        Make sure a bridge network C{name} exists, creating it with the
        driver C{options} and C{labels} (and with no route out if
        C{internal}) if it does not; fire with
        C{(network, created)}: the network as L{inspect_network} describes
        it, and whether this call created it.  A network of that name made
        by someone else is used as it is.
        """

    def set_cpu_shares(container_id, shares):
        """
        Change a running container's CPU weight; fire with C{True} if it
        existed.
        """

    def remove_container(container_id):
        """
        Remove a container and its anonymous volumes, whether running or
        not; fire with C{True} if it existed.
        """

    def list_containers(labels):
        """
        Fire with a list of C{{"id", "name", "labels", "state"}} dicts of
        every container (running or not) that carries all of C{labels}
        (on a cluster also C{"replica"}, its holder, see
        L{container_holder}, and C{"annotations"}).
        """

    def container_state(container_id):
        """
        Fire with the container's C{State} dict (C{Running}, C{OOMKilled},
        C{ExitCode}, ...), or C{None} if it is gone.
        """

    def keeper_address(container_id):
        """
        Fire with C{(address, secret)}: the container's IPv4 address on a
        network of its own namespace (C{None}: none, as with C{--network
        none} or C{host}) and its keeper's secret (its label's; C{None}:
        none), for the direct path to its keeper.
        """

    def spawn_exec(process_protocol, container_id, argv, user, workdir, env, size, tty=True):
        """
        Run C{argv} inside a running container, connected to
        C{process_protocol} the way L{IReactorProcess.spawnProcess} connects
        a L{twisted.internet.interfaces.IProcessProtocol}; fire with the
        L{IExecProcess} once its output is flowing.  With C{tty}, the exec
        gets a terminal of C{size} (cols, rows) and its output arrives on fd
        1; without, stdout and stderr arrive on fds 1 and 2.

        The order is: C{makeConnection}, then the returned Deferred fires,
        then the output (C{childDataReceived}), however early the program
        writes; its end reaches C{processEnded} (C{ProcessDone} for exit
        code 0, else C{ProcessTerminated} with the code, when known).  Fail
        with L{capsule.core.errors.ContainerGone} if the container is gone or
        not running.
        """

    def export_workspace(container_id, path, write):
        """
        Stream C{path} of the container as a tar archive (its entries named
        after C{path}'s last component, as C{docker cp} does), calling
        C{write(chunk)} on a worker thread for each chunk; C{write} may block
        to apply backpressure.  Fire when done; fail with
        L{capsule.core.errors.ContainerGone} if the container is gone.
        """

    def run_command(container_id, argv, user, workdir, env, stdin=b"", max_output=1048576,
                    timeout=None):
        """
        Run C{argv} in a running container without a TTY, to completion;
        fire with a L{capsule.engine.command.CommandResult}.  C{stdin} is bytes,
        written and then closed, or a callable given the exec's input (an
        L{twisted.internet.interfaces.IConsumer}) that fires a Deferred once
        it wrote everything.  At most C{max_output} bytes of each of stdout
        and stderr are kept; the rest is read and dropped.  After
        C{timeout} seconds capsule stops waiting (C{cut}; the exit code is
        then C{None}): the engine cannot kill an exec, so the caller bounds
        the command itself.  Fail with L{capsule.core.errors.ContainerGone} if
        the container is gone or not running.
        """


    # -- kept sessions, forks and snapshots (docs/keeping.md) ----------------

    def stop_container(container_id, timeout=10):
        """
        Stop a container, keeping its file system (its writable layer and
        its volumes): SIGTERM, then SIGKILL after C{timeout} seconds.  Fire
        with C{True} if it existed (stopping a stopped container is not an
        error).
        """

    def start_container(container_id):
        """
        Start a stopped container again (its command runs anew; nothing of
        its processes survived the stop); fire once it runs.  Fail with
        L{capsule.core.errors.ContainerGone} if it no longer exists.
        """

    def kept_containers(labels):
        """
        Fire with a list of dicts, one per container carrying all of
        C{labels} that is not running: C{id}, C{name}, C{labels},
        C{state} (Docker's: C{exited}, C{created}, ...), C{created} and
        C{finished} (Unix times; C{finished} 0.0 if never stopped), and
        C{size}: its writable layer's bytes (C{None} when the engine did
        not say).
        """

    def put_file(container_id, path, data, mode=0o600, uid=1000, gid=1000):
        """
        Write C{data} (bytes) as the file C{path} (absolute) of a container,
        running or stopped, creating its directory; fire when written.
        Fail with L{capsule.core.errors.ContainerGone} if it is gone.
        """

    def read_file(container_id, path, max_bytes):
        """
        Fire with the bytes of the file C{path} of a container, running or
        stopped (at most its last C{max_bytes}), or C{None} if it has no
        such file.  Fail with L{capsule.core.errors.ContainerGone} if it
        is gone.
        """

    def container_cpu(container_id):
        """
        Fire with the CPU time, in seconds, that the container's processes
        used since it started (a counter that only grows while it runs),
        or C{None} when the engine cannot say.  Cheap: read from the
        container's cgroup where capsule shares the engine's host.
        """

    def snapshot_container(container_id, repository, tag, labels):
        """
        Copy a container's file system (running or stopped): its writable
        layer as the image C{repository:tag} carrying C{labels}, and each of
        its anonymous volumes as a new volume carrying C{labels}.  Fire with
        a L{capsule.core.kept.Snapshot} describing both (the image, and the
        volumes by their mount point), from which
        L{create_session_container} makes a container whose spec names the
        image and mounts those volumes.
        """

    def list_snapshots(labels):
        """
        Fire with the L{capsule.core.kept.Snapshot}s whose image carries all
        of C{labels}.
        """

    def remove_snapshot(snapshot):
        """
        Remove a L{capsule.core.kept.Snapshot}'s image and volumes; fire
        with C{True} if the image existed.  What a container made from it
        uses stays (its layers, and the volumes it mounts, which are that
        container's now): L{prune_snapshots} removes them once it is gone.
        """

    def copy_snapshot_volumes(snapshot, labels):
        """
        Fire with new copies of a L{capsule.core.kept.Snapshot}'s volumes,
        by mount point, carrying C{labels}: what a container made from a
        snapshot that stays (a named one) mounts, so that the snapshot's own
        volumes never change.  (A fork's passing snapshot needs none: its
        volumes become the new container's.)
        """

    def fork_container(container_id, session_id, spec, fast=True):
        """
        Create and start a container for session C{session_id} from the
        L{capsule.core.spec.ContainerSpec} C{spec} whose file system is a
        copy of the container C{container_id}'s (running or stopped): its
        writable layer and each of its anonymous volumes (as new volumes
        carrying C{spec}'s labels and C{io.capsule.volume=copy}, which
        L{prune_snapshots} removes once the new container is gone, and
        which the new container's label C{io.capsule.own-volumes} names:
        C{MOUNT=NAME,...}); the named volumes C{spec} mounts are shared,
        not copied.  Writes to
        either later are the other's no more.  Fire with the new
        container's id.  Fail with L{capsule.core.errors.ContainerGone} if
        the source is gone; nothing is left behind by a failure.

        The new container's image is the source's (its layer lies on it),
        whatever C{spec} names; the rest of C{spec} is the new container's.
        The engine copies the files on its host where it can (a local
        overlay2 engine, capsule root); else, or with C{fast} false, by a
        snapshot (L{snapshot_container}) whose image's tag is removed once
        the container exists.  The result is the same.
        """

    def unpause_container(container_id):
        """
        Thaw a paused container (capsule pauses one only while a fork's
        files are copied on the host: a capsule that stopped meanwhile can
        have left it so); fire with C{True} if it was paused.
        """

    def renew_replica(replica, seconds):
        """
        Say that the capsule replica C{replica} lives for C{seconds} more
        (on a cluster: make or renew its Lease); fire with C{None}.  A
        single host has one server and no replicas: it does nothing.
        """

    def drop_replica(replica):
        """
        Say that the replica C{replica} is gone (it stops cleanly): what it
        held is an orphan at once.  Fire with whether it had said it lived
        (a single host: C{False}).
        """

    def live_replicas():
        """
        Fire with the set of the names of the replicas that live now (whose
        liveness has not lapsed).  A single host: an empty set.
        """

    def container_holder(container_id):
        """
        Fire with the name of the replica that holds the container (C{None}:
        none says); fail with L{capsule.core.errors.ContainerGone} if it is
        gone.  A single host: C{None}, whatever the container.  (A container
        listed by L{list_containers} may say it too, as C{"replica"}.)
        """

    def claim_container(container_id, replica, holder=None, annotations=None, labels=None):
        """
        Take the container for the replica C{replica} if its holder is still
        C{holder}, with C{annotations} (what the container says of itself
        besides its labels, e.g. whose session it holds) and C{labels}
        added (those the engine can hold: a user's name that is not a
        Kubernetes label value stays in the annotations only); fire with C{True} if C{replica} holds it now, C{False} if
        another replica took it first (of replicas that try at once, one
        wins); fail with L{capsule.core.errors.ContainerGone} if it is
        gone.  A single host holds everything: C{True}, whatever the
        container.
        """

    def prune_snapshots(labels, grace=600.0):
        """
        Remove what containers made from removed snapshots leave once they
        are removed (the engine removes only a container's anonymous
        volumes): untagged snapshot images carrying all of C{labels} that
        no container uses, and snapshot volume copies carrying them, made
        more than C{grace} seconds ago, that no container mounts and no
        snapshot names.  Fire with how many images and volumes were
        removed.
        """


class IExecProcess(Interface):
    """
    A process started with L{IDockerAPI.spawn_exec}: the transport its
    process protocol writes to.  It is also an
    L{twisted.internet.interfaces.IPushProducer} of the output.
    """

    exec_id = Attribute("Docker's id of the exec.")

    def write(data):
        """
        Write bytes to the process's terminal.
        """

    def resize(cols, rows):
        """
        Set the terminal size.  Resizes that arrive faster than Docker applies
        them are coalesced; the last one always wins.
        """

    def throttle_input(producer):
        """
        Register C{producer} (an L{IPushProducer}: what feeds this process's
        input) to be paused while the process's input is not taken in.
        """

    def loseConnection():
        """
        Detach from the process (its terminal sees a hang-up once Docker
        notices).
        """

    def pauseProducing():
        """
        Stop reading output until L{resumeProducing}.
        """

    def resumeProducing():
        """
        Read output again.
        """


class ISessionClient(Interface):
    """
    What a session may do to the client attached to it.
    """

    def session_started(session, resumed, offset, replay):
        """
        The session is running and this client is attached to it; the next
        output byte it gets has offset C{offset}, and the first C{replay}
        bytes it gets were produced before it attached.
        """

    def session_output(data):
        """
        Terminal output bytes for the client.
        """

    def session_dropped(count, offset):
        """
        C{count} bytes the client missed are no longer held; what follows
        starts at C{offset}.
        """

    def session_notice(code, message):
        """
        Something the person should know that is not output (the shell was
        restarted, the engine went away or came back).
        """

    def session_failed(message, code):
        """
        The session could not be started or resumed; the client should be
        told C{message} and let go.
        """

    def session_ended(exit_code, message):
        """
        The session is over: its shell exited with C{exit_code} (C{None} if
        not known); C{message} says what happened.
        """

    def session_interrupted(message):
        """
        The server is stopping but the session lives on: the client should
        reconnect to resume it.
        """

    def pause_input(paused):
        """
        Stop (C{True}) or start again (C{False}) reading the client's input:
        the shell is not taking it in.
        """

    def session_taken_over():
        """
        Another client attached to this session; this one is let go.
        """
