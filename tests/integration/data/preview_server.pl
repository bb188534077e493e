#!/usr/bin/perl
# A small HTTP and WebSocket server for the preview tests, run in a session
# (the session image has perl): perl preview_server.pl PORT
#   GET /hello          a line of text
#   GET /headers        the request's head, as it arrived
#   GET /big?n=BYTES    BYTES bytes of "x"
#   POST|PUT /upload    reads the body (Content-Length or chunked): "received N"
#   GET /page           an HTML page whose script shows document.cookie
#   a WebSocket upgrade echoes every text and binary message
use strict;
use warnings;
use IO::Socket::INET;
use Digest::SHA qw(sha1);
use MIME::Base64 qw(encode_base64);
$SIG{CHLD} = 'IGNORE';
my $port = shift || 3000;
my $server = IO::Socket::INET->new(LocalAddr => '0.0.0.0', LocalPort => $port, Listen => 64,
                                   ReuseAddr => 1) or die "listen: $!";
while (1) {
    my $c = $server->accept or next;
    my $pid = fork;
    if (!defined $pid || $pid) { close $c; next; }
    close $server;
    serve($c);
    exit 0;
}

sub answer {
    my ($c, $status, $type, $body, @more) = @_;
    print $c "HTTP/1.1 $status\r\nContent-Type: $type\r\nContent-Length: " . length($body)
        . "\r\n" . join('', map { "$_\r\n" } @more) . "Connection: close\r\n\r\n" . $body;
}

sub serve {
    my $c = shift;
    binmode $c;
    my $head = '';
    while (my $line = <$c>) { $head .= $line; last if $line eq "\r\n"; }
    my ($method, $target) = $head =~ /^(\S+) (\S+)/ or return;
    my %h;
    for (split /\r\n/, $head) { $h{lc $1} = $2 if /^([^:]+):\s*(.*)$/; }
    if (($h{upgrade} || '') =~ /websocket/i) { return websocket($c, $h{'sec-websocket-key'}); }
    if ($target =~ m{^/hello}) { return answer($c, "200 OK", "text/plain", "hello from the session\n"); }
    if ($target =~ m{^/headers}) { return answer($c, "200 OK", "text/plain", $head); }
    if ($target =~ m{^/page}) {
        return answer($c, "200 OK", "text/html", "<!doctype html><title>app</title>"
            . "<p id=c></p><script>document.getElementById('c').textContent="
            . "'cookies:'+document.cookie;</script>",
            "Set-Cookie: app_cookie=1; Path=/", "Set-Cookie: capsule_session=evil; Path=/");
    }
    if ($target =~ m{^/big\?n=(\d+)}) {
        my $n = $1;
        print $c "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: $n\r\nConnection: close\r\n\r\n";
        my $block = 'x' x 65536;
        while ($n > 0) { my $k = $n < 65536 ? $n : 65536; print $c substr($block, 0, $k) or return; $n -= $k; }
        return;
    }
    if ($target =~ m{^/upload}) {
        my $got = 0; my $buf;
        if (($h{'transfer-encoding'} || '') =~ /chunked/i) {
            while (1) {
                my $size = <$c>; last unless defined $size; $size = hex($size);
                last if $size == 0;
                while ($size > 0) { my $r = read($c, $buf, $size < 65536 ? $size : 65536); last unless $r; $got += $r; $size -= $r; }
                <$c>;
            }
        } else {
            my $n = $h{'content-length'} || 0;
            while ($n > 0) { my $r = read($c, $buf, $n < 65536 ? $n : 65536); last unless $r; $got += $r; $n -= $r; }
        }
        return answer($c, "200 OK", "text/plain", "received $got");
    }
    answer($c, "404 Not Found", "text/plain", "no such page\n");
}

sub websocket {
    my ($c, $key) = @_;
    my $accept = encode_base64(sha1($key . '258EAFA5-E914-47DA-95CA-C5AB0DC85B11'), '');
    print $c "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: $accept\r\n\r\n";
    $c->autoflush(1);
    while (1) {
        my $hdr; read($c, $hdr, 2) == 2 or return;
        my ($b1, $b2) = unpack('CC', $hdr);
        my $op = $b1 & 15; my $len = $b2 & 127; my $buf;
        if ($len == 126) { read($c, $buf, 2); $len = unpack('n', $buf); }
        elsif ($len == 127) { read($c, $buf, 8); $len = unpack('Q>', $buf); }
        my $mask = ''; if ($b2 & 128) { read($c, $mask, 4); }
        my $data = ''; while (length($data) < $len) { read($c, $buf, $len - length($data)) or return; $data .= $buf; }
        if ($mask ne '') { my $m = $mask x (int($len / 4) + 1); $data = $data ^ substr($m, 0, $len); }
        my $n = length $data;
        my $out = pack('C', 0x80 | $op) . ($n < 126 ? pack('C', $n) : $n < 65536 ? pack('Cn', 126, $n) : pack('CQ>', 127, $n)) . $data;
        print $c $out;
        return if $op == 8;
    }
}
