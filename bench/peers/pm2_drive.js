// Drives pm2 (its daemon under $PM2_HOME) for roster-bench's spawn scenario.
//
//     node pm2_drive.js PM2_MODULE_DIR N CAP_SECS
//
// Connects (starting the daemon), listens on pm2's bus, starts N apps of /bin/true
// (interpreter none, autorestart off) with 32 start calls in flight, and waits until N
// `exit` events have arrived or pm2's list shows all N ended (its bus may drop an `exit` of
// a process that ends at once). N = 0 only starts the daemon. Prints one JSON line:
// {"secs": <first start -> last exit>, "exits": <count>, "pid": <daemon pid>}.
// Stops waiting after CAP_SECS and reports what it counted by then.
const path = require('path');
const fs = require('fs');
const pm2 = require(path.join(process.argv[2], 'pm2'));
const n = parseInt(process.argv[3], 10);
const inFlight = 32;
const capMs = parseFloat(process.argv[4] || '120') * 1000;

function fail(e) {
  console.error(String(e && e.stack || e));
  process.exit(1);
}

pm2.connect((err) => {
  if (err) return fail(err);
  const pid = parseInt(fs.readFileSync(path.join(process.env.PM2_HOME, 'pm2.pid'), 'utf8'), 10);
  if (n === 0) {
    console.log(JSON.stringify({ secs: 0, exits: 0, pid }));
    pm2.disconnect();
    return;
  }
  pm2.launchBus((err, bus) => {
    if (err) return fail(err);
    let exits = 0;
    let next = 0;
    let start = 0;
    const timer = setTimeout(() => finish(), capMs);
    function finish() {
      if (done) return;
      done = true;
      clearTimeout(timer);
      clearInterval(poller);
      const secs = Number(process.hrtime.bigint() - start) / 1e9;
      console.log(JSON.stringify({ secs, exits, pid }));
      pm2.disconnect();
      process.exit(0);
    }
    let done = false;
    const poller = setInterval(() => {
      if (next < n || done) return;
      pm2.list((err, list) => {
        if (err || done) return;
        const ended = list.filter((p) => String(p.name).startsWith('t') &&
          ['stopped', 'errored'].includes(p.pm2_env.status)).length;
        if (ended >= n) { exits = Math.max(exits, ended); finish(); }
      });
    }, 100);
    bus.on('process:event', (packet) => {
      if (packet.event === 'exit' && String(packet.process.name).startsWith('t')) {
        exits += 1;
        if (exits === n) finish();
      }
    });
    function launch() {
      if (next >= n) return;
      const i = next++;
      pm2.start({ name: 't' + i, script: '/bin/true', interpreter: 'none', autorestart: false }, (err) => {
        if (err) return fail(err);
        launch();
      });
    }
    start = process.hrtime.bigint();
    for (let k = 0; k < inFlight; k++) launch();
  });
});
