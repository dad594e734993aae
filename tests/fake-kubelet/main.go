// pc-fake-kubelet: a TEST-ONLY stand-in for a kubelet, so the real kube-apiserver in
// the e2e tier has somewhere to send exec and logs for its one registered Node/Pod.
//
// It is built by `cargo xtask setup` inside Debian's kubernetes 1.20.2 source tree, so
// the SPDY exec path is the real kubelet streaming code (pkg/kubelet/cri/streaming).
// The WebSocket v5.channel.k8s.io protocol (KEP-4006) postdates 1.20 and is answered
// by a small handler here. Containers are fake: the commands below are interpreted,
// nothing is executed on the host.
//
//	echo ARGS...   prints ARGS
//	cat            copies stdin to stdout
//	fail N         prints "failing" to stderr and exits with code N
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"log"
	"net/http"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/websocket"
	"k8s.io/apimachinery/pkg/types"
	remotecommandconsts "k8s.io/apimachinery/pkg/util/remotecommand"
	clientremotecommand "k8s.io/client-go/tools/remotecommand"
	"k8s.io/kubernetes/pkg/kubelet/cri/streaming/remotecommand"
	utilexec "k8s.io/utils/exec"
)

type fakeExecutor struct{}

func run(cmd []string, in io.Reader, out, errw io.Writer) (int, error) {
	if len(cmd) == 0 {
		return 127, fmt.Errorf("no command")
	}
	switch cmd[0] {
	case "echo":
		fmt.Fprintln(out, strings.Join(cmd[1:], " "))
		return 0, nil
	case "cat":
		if in != nil {
			io.Copy(out, in)
		}
		return 0, nil
	case "fail":
		code := 1
		if len(cmd) > 1 {
			code, _ = strconv.Atoi(cmd[1])
		}
		fmt.Fprintln(errw, "failing")
		return code, fmt.Errorf("command terminated with exit code %d", code)
	}
	fmt.Fprintf(errw, "pc-fake-kubelet: unknown command %q\n", cmd[0])
	return 127, fmt.Errorf("unknown command")
}

func (fakeExecutor) ExecInContainer(name string, uid types.UID, container string, cmd []string, in io.Reader, out, errw io.WriteCloser, tty bool, resize <-chan clientremotecommand.TerminalSize, timeout time.Duration) error {
	var o, e io.Writer = ioutil.Discard, ioutil.Discard
	if out != nil {
		o = out
	}
	if errw != nil {
		e = errw
	}
	code, err := run(cmd, in, o, e)
	if code != 0 {
		return utilexec.CodeExitError{Err: err, Code: code}
	}
	return nil
}

// /exec/{namespace}/{pod}/{container}
func handleExec(w http.ResponseWriter, req *http.Request) {
	parts := strings.Split(strings.TrimPrefix(req.URL.Path, "/exec/"), "/")
	if len(parts) != 3 {
		http.Error(w, "bad exec path", http.StatusBadRequest)
		return
	}
	q := req.URL.Query()
	cmd := q["command"]
	log.Printf("exec %s/%s/%s %q upgrade=%q protocols=%q", parts[0], parts[1], parts[2], cmd,
		req.Header.Get("Upgrade"), req.Header.Get("Sec-WebSocket-Protocol")+req.Header.Get("X-Stream-Protocol-Version"))
	if strings.EqualFold(req.Header.Get("Upgrade"), "websocket") &&
		strings.Contains(req.Header.Get("Sec-WebSocket-Protocol"), "v5.channel.k8s.io") {
		serveV5(w, req, cmd, q.Get("stdin") == "true" || q.Get("input") == "1")
		return
	}
	opts := &remotecommand.Options{
		Stdin:  q.Get("stdin") == "true" || q.Get("input") == "1",
		Stdout: q.Get("stdout") == "true" || q.Get("output") == "1",
		Stderr: q.Get("stderr") == "true" || q.Get("error") == "1",
		TTY:    q.Get("tty") == "true",
	}
	remotecommand.ServeExec(w, req, fakeExecutor{}, parts[1], "", parts[2], cmd, opts,
		time.Minute, 30*time.Second, remotecommandconsts.SupportedStreamingProtocols)
}

// serveV5 answers exec over WebSocket with the v5.channel.k8s.io framing: each binary
// message starts with its channel (0 stdin, 1 stdout, 2 stderr, 3 status, 255 close).
func serveV5(w http.ResponseWriter, req *http.Request, cmd []string, stdin bool) {
	srv := websocket.Server{
		Handshake: func(c *websocket.Config, r *http.Request) error {
			c.Protocol = []string{"v5.channel.k8s.io"}
			return nil
		},
		Handler: func(ws *websocket.Conn) {
			ws.PayloadType = websocket.BinaryFrame
			send := func(ch byte, data []byte) {
				websocket.Message.Send(ws, append([]byte{ch}, data...))
			}
			var in io.Reader
			if stdin {
				pr, pw := io.Pipe()
				in = pr
				go func() {
					for {
						var msg []byte
						if err := websocket.Message.Receive(ws, &msg); err != nil || len(msg) == 0 {
							pw.Close()
							return
						}
						switch msg[0] {
						case 0:
							pw.Write(msg[1:])
						case 255: // close of a channel: stdin ended
							pw.Close()
							return
						}
					}
				}()
			}
			out := &chanWriter{send: send, ch: 1}
			errw := &chanWriter{send: send, ch: 2}
			code, err := run(cmd, in, out, errw)
			status := map[string]interface{}{"metadata": map[string]interface{}{}, "status": "Success"}
			if code != 0 {
				status = map[string]interface{}{
					"metadata": map[string]interface{}{}, "status": "Failure", "message": err.Error(),
					"reason":  "NonZeroExitCode",
					"details": map[string]interface{}{"causes": []map[string]string{{"reason": "ExitCode", "message": strconv.Itoa(code)}}},
				}
			}
			b, _ := json.Marshal(status)
			send(3, b)
			ws.Close() // close frame with 1000
		},
	}
	srv.ServeHTTP(w, req)
}

type chanWriter struct {
	send func(byte, []byte)
	ch   byte
}

func (c *chanWriter) Write(p []byte) (int, error) {
	c.send(c.ch, p)
	return len(p), nil
}

// What the "canary" container logs: each credential is a unique marker string.
var canaryLog = []string{
	"starting\n",
	"connecting with password=pc-log-canary-1 to db\n",
	"-----BEGIN PRIVATE KEY-----\n",
	"PCLOGCANARYKEY2\n",
	"-----END PRIVATE KEY-----\n",
	"aws key AKIAPCLOGCANARY34567 loaded\n",
	"bearer eyJwY2xvZ2NhbmFyeSI6NH0.eyJzdWIiOiJwYy1sb2ctY2FuYXJ5LTQifQ.cGMtbG9nLWNhbmFyeS00LXNpZw\n",
	"done\n",
}

// /containerLogs/{namespace}/{pod}/{container}?follow=true
func handleLogs(w http.ResponseWriter, req *http.Request) {
	log.Printf("logs %s %s", req.URL.Path, req.URL.RawQuery)
	w.Header().Set("Content-Type", "text/plain")
	follow := req.URL.Query().Get("follow") == "true"
	n := 3
	if follow {
		n = 8
	}
	flusher, _ := w.(http.Flusher)
	if strings.HasSuffix(req.URL.Path, "/canary") {
		// Credentials in a log stream, one line at a time (the masking tests' canaries).
		for _, l := range canaryLog {
			fmt.Fprint(w, l)
			if flusher != nil {
				flusher.Flush()
			}
			if follow {
				select {
				case <-req.Context().Done():
					return
				case <-time.After(300 * time.Millisecond):
				}
			}
		}
		return
	}
	for i := 1; i <= n; i++ {
		fmt.Fprintf(w, "log line %d\n", i)
		if flusher != nil {
			flusher.Flush()
		}
		if follow && i >= 3 {
			select {
			case <-req.Context().Done():
				return
			case <-time.After(400 * time.Millisecond):
			}
		}
	}
}

func main() {
	addr := flag.String("listen", "127.0.0.1:10250", "address")
	cert := flag.String("cert", "", "TLS certificate (PEM)")
	key := flag.String("key", "", "TLS key (PEM)")
	flag.Parse()
	mux := http.NewServeMux()
	mux.HandleFunc("/exec/", handleExec)
	mux.HandleFunc("/containerLogs/", handleLogs)
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	log.Printf("pc-fake-kubelet (test-only) listening on %s", *addr)
	log.Fatal(http.ListenAndServeTLS(*addr, *cert, *key, mux))
}
